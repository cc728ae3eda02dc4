//! Order-preserving key encoding, after the FoundationDB tuple layer.
//!
//! Every LMDB key Anthill writes is a *tuple* of elements packed so that comparing the encoded bytes
//! (LMDB's default `memcmp` order) gives the same order as comparing the tuples element by element.
//! Only the element kinds the node needs are supported:
//!
//! | element          | encoding                                                                 |
//! |------------------|--------------------------------------------------------------------------|
//! | byte string      | `0x01`, the bytes with every `0x00` written as `0x00 0xFF`, then `0x00`   |
//! | UTF-8 string     | `0x02`, then as a byte string                                            |
//! | unsigned integer | `0x14 + n`, then the value big-endian in its `n` significant bytes (0–8) |
//!
//! These are the FoundationDB type codes, so keys can be decoded with any tuple-layer library.
//! A shorter integer sorts before a longer one because its type code is smaller; equal lengths
//! compare by their big-endian bytes. The escaping keeps a string that is a prefix of another
//! sorting first, and makes `pack(prefix)` a byte prefix of every key that extends it.
//! See `docs/storage.md` for the key layout of each database.

use thiserror::Error;

const BYTES_CODE: u8 = 0x01;
const STRING_CODE: u8 = 0x02;
const INT_ZERO_CODE: u8 = 0x14;
const ESCAPE: u8 = 0xFF;

/// One element of a tuple to pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem<'a> {
    Bytes(&'a [u8]),
    Str(&'a str),
    U64(u64),
}

/// One decoded element.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Value {
    Bytes(Vec<u8>),
    Str(String),
    U64(u64),
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("key byte {offset}: unknown tuple type code {code:#04x}")]
    UnknownCode { offset: usize, code: u8 },
    #[error("key byte {offset}: element is cut short")]
    Truncated { offset: usize },
    #[error("key byte {offset}: string is not valid UTF-8")]
    BadUtf8 { offset: usize },
}

/// Appends the encoding of `elems` to `out`.
pub fn pack_into(out: &mut Vec<u8>, elems: &[Elem<'_>]) {
    for elem in elems {
        match *elem {
            Elem::Bytes(bytes) => pack_bytes(out, BYTES_CODE, bytes),
            Elem::Str(s) => pack_bytes(out, STRING_CODE, s.as_bytes()),
            Elem::U64(v) => pack_u64(out, v),
        }
    }
}

/// The encoding of `elems` as a new vector.
pub fn pack(elems: &[Elem<'_>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    pack_into(&mut out, elems);
    out
}

fn pack_bytes(out: &mut Vec<u8>, code: u8, bytes: &[u8]) {
    out.push(code);
    for &b in bytes {
        out.push(b);
        if b == 0 {
            out.push(ESCAPE);
        }
    }
    out.push(0);
}

fn pack_u64(out: &mut Vec<u8>, v: u64) {
    let len = 8 - (v.leading_zeros() / 8) as usize;
    debug_assert!(len <= 8);
    out.push(INT_ZERO_CODE + len as u8);
    out.extend_from_slice(&v.to_be_bytes()[8 - len..]);
}

/// Decodes a whole key back into its elements.
pub fn unpack(key: &[u8]) -> Result<Vec<Value>, KeyError> {
    let mut values = Vec::new();
    let mut offset = 0;
    while offset < key.len() {
        let code = key[offset];
        let start = offset + 1;
        match code {
            BYTES_CODE | STRING_CODE => {
                let (bytes, next) = unpack_bytes(key, start)?;
                offset = next;
                values.push(if code == BYTES_CODE {
                    Value::Bytes(bytes)
                } else {
                    Value::Str(String::from_utf8(bytes).map_err(|_| KeyError::BadUtf8 { offset: start })?)
                });
            }
            INT_ZERO_CODE..=0x1C => {
                let len = usize::from(code - INT_ZERO_CODE);
                let end = start + len;
                let digits = key.get(start..end).ok_or(KeyError::Truncated { offset: start })?;
                let mut be = [0u8; 8];
                be[8 - len..].copy_from_slice(digits);
                values.push(Value::U64(u64::from_be_bytes(be)));
                offset = end;
            }
            _ => return Err(KeyError::UnknownCode { offset, code }),
        }
    }
    Ok(values)
}

fn unpack_bytes(key: &[u8], mut offset: usize) -> Result<(Vec<u8>, usize), KeyError> {
    let mut bytes = Vec::new();
    loop {
        match key.get(offset) {
            None => return Err(KeyError::Truncated { offset }),
            Some(0) if key.get(offset + 1) == Some(&ESCAPE) => {
                bytes.push(0);
                offset += 2;
            }
            Some(0) => return Ok((bytes, offset + 1)),
            Some(&b) => {
                bytes.push(b);
                offset += 1;
            }
        }
    }
}

/// Key of an event in the `log` database: `(seq,)`, the global commit sequence.
pub fn log_key(seq: u64) -> Vec<u8> {
    pack(&[Elem::U64(seq)])
}

/// Decodes a `log` key into its sequence number.
pub fn decode_log_key(key: &[u8]) -> Result<u64, KeyError> {
    match unpack(key)?.as_slice() {
        [Value::U64(seq)] => Ok(*seq),
        _ => Err(KeyError::UnknownCode { offset: 0, code: key.first().copied().unwrap_or(0) }),
    }
}

/// Key of an entry in the `partitions` index: `(partition, position)`.
pub fn event_key(partition: u32, position: u64) -> Vec<u8> {
    pack(&[Elem::U64(u64::from(partition)), Elem::U64(position)])
}

/// Key prefix shared by every event of one partition.
pub fn partition_prefix(partition: u32) -> Vec<u8> {
    pack(&[Elem::U64(u64::from(partition))])
}

/// Key of a stream's event in the `streams` index: `(stream, version)`.
pub fn stream_key(stream: &str, version: u64) -> Vec<u8> {
    pack(&[Elem::Str(stream), Elem::U64(version)])
}

/// Key prefix shared by every `streams` index entry of one stream: `(stream,)`.
pub fn stream_prefix(stream: &str) -> Vec<u8> {
    pack(&[Elem::Str(stream)])
}

/// Decodes a `partitions` index key into `(partition, position)`.
pub fn decode_event_key(key: &[u8]) -> Result<(u32, u64), KeyError> {
    match unpack(key)?.as_slice() {
        [Value::U64(p), Value::U64(pos)] if u32::try_from(*p).is_ok() => Ok((*p as u32, *pos)),
        _ => Err(KeyError::UnknownCode { offset: 0, code: key.first().copied().unwrap_or(0) }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn owned(v: &Value) -> Elem<'_> {
        match v {
            Value::Bytes(b) => Elem::Bytes(b),
            Value::Str(s) => Elem::Str(s),
            Value::U64(n) => Elem::U64(*n),
        }
    }

    #[test]
    fn integers_use_the_foundationdb_codes() {
        assert_eq!(pack(&[Elem::U64(0)]), vec![0x14]);
        assert_eq!(pack(&[Elem::U64(1)]), vec![0x15, 0x01]);
        assert_eq!(pack(&[Elem::U64(256)]), vec![0x16, 0x01, 0x00]);
        assert_eq!(pack(&[Elem::U64(u64::MAX)]), [&[0x1C][..], &[0xFF; 8]].concat());
    }

    #[test]
    fn strings_escape_nul_and_terminate() {
        assert_eq!(pack(&[Elem::Str("a\0b")]), vec![0x02, b'a', 0x00, 0xFF, b'b', 0x00]);
        assert_eq!(pack(&[Elem::Bytes(b"")]), vec![0x01, 0x00]);
    }

    #[test]
    fn given_a_stream_prefix_when_packed_then_it_prefixes_every_version_key() {
        let prefix = stream_prefix("orders-1");
        assert!(stream_key("orders-1", 7).starts_with(&prefix));
        assert!(!stream_key("orders-10", 7).starts_with(&prefix));
    }

    #[test]
    fn given_a_truncated_key_when_unpacked_then_the_error_names_the_offset() {
        assert_eq!(unpack(&[0x16, 0x01]), Err(KeyError::Truncated { offset: 1 }));
        assert_eq!(unpack(&[0x02, b'a']), Err(KeyError::Truncated { offset: 2 }));
        assert_eq!(unpack(&[0x30]), Err(KeyError::UnknownCode { offset: 0, code: 0x30 }));
    }

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<u64>().prop_map(Value::U64),
            (0u64..300).prop_map(Value::U64),
            proptest::collection::vec(prop_oneof![Just(0u8), Just(0xFF), any::<u8>()], 0..6).prop_map(Value::Bytes),
            "[a\\x00b]{0,5}".prop_map(Value::Str),
        ]
    }

    proptest! {
        #[test]
        fn packing_round_trips(tuple in proptest::collection::vec(value(), 0..5)) {
            let elems: Vec<Elem<'_>> = tuple.iter().map(owned).collect();
            prop_assert_eq!(unpack(&pack(&elems)).unwrap(), tuple);
        }

        #[test]
        fn byte_order_is_tuple_order(a in proptest::collection::vec(value(), 0..4),
                                     b in proptest::collection::vec(value(), 0..4)) {
            // `Value`'s derived order ranks kinds as their type codes do (bytes < string < integer).
            let pa = pack(&a.iter().map(owned).collect::<Vec<_>>());
            let pb = pack(&b.iter().map(owned).collect::<Vec<_>>());
            prop_assert_eq!(pa.cmp(&pb), a.cmp(&b));
        }

        #[test]
        fn event_keys_sort_by_partition_then_position(p1 in 0u32..70, q1 in any::<u64>(), p2 in 0u32..70, q2 in any::<u64>()) {
            prop_assert_eq!(event_key(p1, q1).cmp(&event_key(p2, q2)), (p1, q1).cmp(&(p2, q2)));
            prop_assert_eq!(decode_event_key(&event_key(p1, q1)).unwrap(), (p1, q1));
        }
    }
}
