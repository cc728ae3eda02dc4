//! The stored form of one event: the value under its log sequence key.
//!
//! Layout (all integers big-endian), format 3:
//!
//! ```text
//! u8  format = 3
//! u32 crc32 (IEEE) of every byte after this field
//! u32 partition | u64 position | u64 stream_version | u64 append_time_us | u64 epoch
//! u8  flags: bit 0 = the event's append goes on at the next position of its partition
//! u16 len + stream id | u16 len + event type | u32 len + payload
//! u16 metadata entries, each: u16 len + key, u32 len + value
//! ```
//!
//! Format 2 is format 3 without the flags byte; it is still read (as flags 0: every event ends its
//! append, which is what replication assumed before format 3).
//!
//! The flag marks the events of one atomic append (or of one command) but its last, so that
//! replication never moves part of an append: a leader sends, and a replica stores, whole appends
//! only (docs/replication.md, "Atomic appends").
//!
//! The checksum turns silent corruption of a page into a clear error on read instead of a wrong
//! event. The record names its own partition, position, stream and version, so the indexes can be
//! rebuilt from the log alone and a read can check that an index entry led to the event it meant.
//! Decoding never trusts a length: a value that is cut short or inconsistent is reported as corrupt,
//! never a panic. Encoding asserts every length fits its field; the log's validation keeps requests
//! far inside them.

use thiserror::Error;

const FORMAT_V2: u8 = 2;
const FORMAT_V3: u8 = 3;
/// The format byte and the checksum that start every record.
pub const HEADER_BYTES: usize = 1 + 4;
/// partition, position, stream version, append time, epoch, flags.
const FIXED_BYTES: usize = 4 + 8 * 4 + 1;
/// Flag bit: the event's append goes on at the next position.
const ATOMIC_WITH_NEXT: u8 = 1;

/// One event as the log stores and returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    pub partition: u32,
    pub position: u64,
    pub stream: String,
    pub stream_version: u64,
    pub event_type: String,
    pub payload: Vec<u8>,
    /// Sorted by key; keys are unique.
    pub metadata: Vec<(String, String)>,
    pub append_time_us: u64,
    pub epoch: u64,
    /// The append (or command) that wrote this event goes on at the next position of the
    /// partition: the two stand or fall together.
    pub atomic_with_next: bool,
}

/// Stored data that cannot be what was written: a record or an index entry, named by `what`.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{what} is corrupt: {reason}")]
pub struct CorruptRecord {
    pub what: String,
    pub reason: &'static str,
}

impl CorruptRecord {
    pub fn at_seq(seq: u64, reason: &'static str) -> Self {
        CorruptRecord { what: format!("event record at log sequence {seq}"), reason }
    }
    pub fn in_partition(partition: u32, position: u64, reason: &'static str) -> Self {
        CorruptRecord { what: format!("partition {partition} at position {position}"), reason }
    }
    pub fn in_stream(stream: &str, version: u64, reason: &'static str) -> Self {
        CorruptRecord { what: format!("stream {stream:?} at version {version}"), reason }
    }
}

/// The fields of an event to store, borrowed from wherever they live (an append request or an
/// [`EventRecord`]).
#[derive(Debug, Clone, Copy)]
pub struct RecordRef<'a> {
    pub partition: u32,
    pub position: u64,
    pub stream: &'a str,
    pub stream_version: u64,
    pub event_type: &'a str,
    pub payload: &'a [u8],
    pub metadata: &'a [(String, String)],
    pub append_time_us: u64,
    pub epoch: u64,
    pub atomic_with_next: bool,
}

impl RecordRef<'_> {
    /// Size of the encoded value.
    pub fn encoded_len(&self) -> usize {
        HEADER_BYTES
            + FIXED_BYTES
            + 2
            + self.stream.len()
            + 2
            + self.event_type.len()
            + 4
            + self.payload.len()
            + 2
            + self.metadata.iter().map(|(k, v)| 2 + k.len() + 4 + v.len()).sum::<usize>()
    }

    /// Writes the stored form into `out` (cleared first). Lengths must already have been
    /// validated against the configured limits, which are far below these field widths.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        assert!(self.stream.len() <= usize::from(u16::MAX), "stream id longer than the format allows");
        assert!(self.event_type.len() <= usize::from(u16::MAX), "event type longer than the format allows");
        assert!(self.metadata.len() <= usize::from(u16::MAX), "more metadata entries than the format allows");
        assert!(self.metadata.iter().all(|(k, _)| k.len() <= usize::from(u16::MAX)), "metadata key longer than the format allows");
        assert!(self.payload.len() <= u32::MAX as usize, "payload longer than the format allows");
        out.clear();
        out.reserve(self.encoded_len());
        out.push(FORMAT_V3);
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&self.partition.to_be_bytes());
        out.extend_from_slice(&self.position.to_be_bytes());
        out.extend_from_slice(&self.stream_version.to_be_bytes());
        out.extend_from_slice(&self.append_time_us.to_be_bytes());
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.push(if self.atomic_with_next { ATOMIC_WITH_NEXT } else { 0 });
        put_u16_bytes(out, self.stream.as_bytes());
        put_u16_bytes(out, self.event_type.as_bytes());
        put_u32_bytes(out, self.payload);
        out.extend_from_slice(&(self.metadata.len() as u16).to_be_bytes());
        for (key, value) in self.metadata {
            put_u16_bytes(out, key.as_bytes());
            put_u32_bytes(out, value.as_bytes());
        }
        let crc = crc32fast::hash(&out[HEADER_BYTES..]);
        out[1..HEADER_BYTES].copy_from_slice(&crc.to_be_bytes());
        debug_assert_eq!(out.len(), self.encoded_len());
    }
}

impl EventRecord {
    pub fn as_ref(&self) -> RecordRef<'_> {
        RecordRef {
            partition: self.partition,
            position: self.position,
            stream: &self.stream,
            stream_version: self.stream_version,
            event_type: &self.event_type,
            payload: &self.payload,
            metadata: &self.metadata,
            append_time_us: self.append_time_us,
            epoch: self.epoch,
            atomic_with_next: self.atomic_with_next,
        }
    }

    /// Decodes a stored value found under log sequence `seq` (named in errors).
    pub fn decode(seq: u64, bytes: &[u8]) -> Result<Self, CorruptRecord> {
        let corrupt = |reason| CorruptRecord::at_seq(seq, reason);
        let mut r = Reader { bytes, offset: 0 };
        let format = r.u8().ok_or(corrupt("empty value"))?;
        if format != FORMAT_V2 && format != FORMAT_V3 {
            return Err(corrupt("unknown record format"));
        }
        let crc = r.u32().ok_or(corrupt("header cut short"))?;
        if crc32fast::hash(&bytes[HEADER_BYTES..]) != crc {
            return Err(corrupt("checksum mismatch"));
        }
        let short = || corrupt("value cut short");
        let partition = r.u32().ok_or_else(short)?;
        let position = r.u64().ok_or_else(short)?;
        let stream_version = r.u64().ok_or_else(short)?;
        let append_time_us = r.u64().ok_or_else(short)?;
        let epoch = r.u64().ok_or_else(short)?;
        let flags = if format == FORMAT_V3 { r.u8().ok_or_else(short)? } else { 0 };
        if flags & !ATOMIC_WITH_NEXT != 0 {
            return Err(corrupt("unknown flags"));
        }
        let stream = r.string16().ok_or_else(short)?;
        let event_type = r.string16().ok_or_else(short)?;
        let payload_len = r.u32().ok_or_else(short)? as usize;
        let payload = r.take(payload_len).ok_or_else(short)?.to_vec();
        let entries = r.u16().ok_or_else(short)?;
        let mut metadata = Vec::with_capacity(usize::from(entries));
        for _ in 0..entries {
            let key = r.string16().ok_or_else(short)?;
            let value_len = r.u32().ok_or_else(short)? as usize;
            let value =
                String::from_utf8(r.take(value_len).ok_or_else(short)?.to_vec()).map_err(|_| corrupt("metadata value is not UTF-8"))?;
            metadata.push((key, value));
        }
        if r.offset != bytes.len() {
            return Err(corrupt("trailing bytes"));
        }
        Ok(EventRecord {
            partition,
            position,
            stream,
            stream_version,
            event_type,
            payload,
            metadata,
            append_time_us,
            epoch,
            atomic_with_next: flags & ATOMIC_WITH_NEXT != 0,
        })
    }
}

fn put_u16_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn put_u32_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

struct Reader<'a> {
    bytes: &'a [u8],
    offset: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        let end = self.offset.checked_add(len)?;
        let slice = self.bytes.get(self.offset..end)?;
        self.offset = end;
        Some(slice)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
    }
    fn string16(&mut self) -> Option<String> {
        let len = usize::from(self.u16()?);
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record() -> EventRecord {
        EventRecord {
            partition: 3,
            position: 42,
            stream: "account-7".into(),
            stream_version: 5,
            event_type: "Deposited".into(),
            payload: b"{\"amount\":10}".to_vec(),
            metadata: vec![("correlation".into(), "c-1".into())],
            append_time_us: 1_700_000_000_000_000,
            epoch: 1,
            atomic_with_next: false,
        }
    }

    #[test]
    fn given_a_record_when_encoded_then_it_decodes_to_the_same_record() {
        for atomic_with_next in [false, true] {
            let record = EventRecord { atomic_with_next, ..record() };
            let mut buf = Vec::new();
            record.as_ref().encode_into(&mut buf);
            assert_eq!(buf.len(), record.as_ref().encoded_len());
            assert_eq!(EventRecord::decode(9, &buf), Ok(record));
        }
    }

    #[test]
    fn given_a_format_2_record_then_it_decodes_as_ending_its_append_and_unknown_flags_are_corrupt() {
        let mut v3 = Vec::new();
        EventRecord { atomic_with_next: true, ..record() }.as_ref().encode_into(&mut v3);
        // Format 2 is format 3 without the flags byte, right after the fixed-width fields.
        let flags_at = HEADER_BYTES + FIXED_BYTES - 1;
        let mut v2 = v3.clone();
        v2[0] = FORMAT_V2;
        v2.remove(flags_at);
        let crc = crc32fast::hash(&v2[HEADER_BYTES..]);
        v2[1..HEADER_BYTES].copy_from_slice(&crc.to_be_bytes());
        assert_eq!(EventRecord::decode(9, &v2), Ok(record()));
        let mut unknown = v3;
        unknown[flags_at] = 0b10;
        let crc = crc32fast::hash(&unknown[HEADER_BYTES..]);
        unknown[1..HEADER_BYTES].copy_from_slice(&crc.to_be_bytes());
        assert_eq!(EventRecord::decode(9, &unknown).unwrap_err().reason, "unknown flags");
    }

    #[test]
    fn given_a_flipped_bit_when_decoded_then_the_checksum_catches_it() {
        let mut buf = Vec::new();
        record().as_ref().encode_into(&mut buf);
        let last = buf.len() - 1;
        buf[last] ^= 0x01;
        let err = EventRecord::decode(9, &buf).unwrap_err();
        assert_eq!(err.reason, "checksum mismatch");
    }

    #[test]
    fn given_a_lying_length_with_a_valid_checksum_when_decoded_then_it_is_reported_not_misread() {
        let mut buf = Vec::new();
        record().as_ref().encode_into(&mut buf);
        // The stream id's length field sits after the header and the fixed-width fields.
        let at = HEADER_BYTES + FIXED_BYTES;
        buf[at..at + 2].copy_from_slice(&u16::MAX.to_be_bytes());
        let crc = crc32fast::hash(&buf[HEADER_BYTES..]);
        buf[1..HEADER_BYTES].copy_from_slice(&crc.to_be_bytes());
        assert_eq!(EventRecord::decode(9, &buf).unwrap_err().reason, "value cut short");
        // One byte more than encoded: trailing bytes, also with a valid checksum.
        let mut longer = Vec::new();
        record().as_ref().encode_into(&mut longer);
        longer.push(0);
        let crc = crc32fast::hash(&longer[HEADER_BYTES..]);
        longer[1..HEADER_BYTES].copy_from_slice(&crc.to_be_bytes());
        assert_eq!(EventRecord::decode(9, &longer).unwrap_err().reason, "trailing bytes");
    }

    proptest! {
        #[test]
        fn truncated_values_are_errors_never_panics(cut in 0usize..80) {
            let mut buf = Vec::new();
            record().as_ref().encode_into(&mut buf);
            let cut = cut.min(buf.len() - 1);
            prop_assert!(EventRecord::decode(9, &buf[..cut]).is_err());
        }

        #[test]
        fn arbitrary_records_round_trip(stream in ".{1,20}", ty in ".{0,10}", payload in proptest::collection::vec(any::<u8>(), 0..300),
                                        version in any::<u64>(), meta in proptest::collection::btree_map(".{0,300}", ".{0,300}", 0..4)) {
            let rec = EventRecord { stream, event_type: ty, payload, stream_version: version,
                                    metadata: meta.into_iter().collect(), ..record() };
            let mut buf = Vec::new();
            rec.as_ref().encode_into(&mut buf);
            prop_assert_eq!(EventRecord::decode(9, &buf).unwrap(), rec);
        }
    }
}
