//! `EventLog.AppendSession` on the real binary over gRPC: pipelined appends commit in the order
//! sent, failures are answered per append while the session goes on, and a stopping node answers
//! what it took and ends the call with UNAVAILABLE.

mod common;

use std::time::Duration;

use anthill_proto::v1 as pb;
use common::{append, event, start, total_events};
use pb::append_session_response::Result as Answer;
use pb::expected_version::Kind;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};

/// Opens a session; requests go in through the sender.
async fn open(t: &mut common::TestNode) -> (mpsc::Sender<pb::AppendSessionRequest>, Streaming<pb::AppendSessionResponse>) {
    let (tx, rx) = mpsc::channel(1024);
    let answers = t.clients.log.append_session(ReceiverStream::new(rx)).await.unwrap().into_inner();
    (tx, answers)
}

fn request(id: u64, append: pb::AppendRequest) -> pb::AppendSessionRequest {
    pb::AppendSessionRequest { id, append: Some(append) }
}

async fn next_answer(answers: &mut Streaming<pb::AppendSessionResponse>) -> pb::AppendSessionResponse {
    tokio::time::timeout(Duration::from_secs(20), answers.message()).await.expect("an answer in time").unwrap().expect("the call is open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_appends_pipelined_to_one_stream_then_they_commit_in_the_order_sent() {
    // A small in-flight bound, so the node has to stop reading and resume many times.
    let mut t = start(&["--max-session-in-flight", "4"]).await;
    let (tx, mut answers) = open(&mut t).await;
    const N: u64 = 200;
    // Every append expects the version the previous one makes: only the order sent satisfies all.
    for i in 0..N {
        tx.send(request(1000 + i, append("pipelined", Some(Kind::Exact(i)), vec![event("Step", &i.to_string())]))).await.unwrap();
    }
    let mut versions = vec![0; N as usize];
    for _ in 0..N {
        let answer = next_answer(&mut answers).await;
        match answer.result {
            Some(Answer::Appended(done)) => versions[(answer.id - 1000) as usize] = done.stream_version,
            other => panic!("append {} failed: {other:?}", answer.id),
        }
    }
    assert_eq!(versions, (1..=N).collect::<Vec<_>>());
    let read = t
        .clients
        .log
        .read(pb::ReadRequest { stream: "pipelined".into(), from_version: 1, max_count: 0, linearizable: false })
        .await
        .unwrap()
        .into_inner();
    let payloads: Vec<String> = read.events.iter().map(|e| String::from_utf8(e.payload.clone()).unwrap()).collect();
    assert_eq!(payloads, (0..N).map(|i| i.to_string()).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_failing_appends_then_each_is_answered_with_its_status_and_the_session_goes_on() {
    let mut t = start(&[]).await;
    let (tx, mut answers) = open(&mut t).await;
    tx.send(request(1, append("acct", None, vec![event("Opened", "")]))).await.unwrap();
    tx.send(request(2, append("acct", Some(Kind::Exact(5)), vec![event("Late", "")]))).await.unwrap();
    tx.send(request(3, append("", None, vec![event("NoStream", "")]))).await.unwrap();
    tx.send(pb::AppendSessionRequest { id: 4, append: None }).await.unwrap();
    tx.send(request(5, append("acct", Some(Kind::Exact(1)), vec![event("Deposited", "")]))).await.unwrap();
    // The client is done sending: the node answers everything, then ends the call cleanly.
    drop(tx);
    let mut by_id = std::collections::BTreeMap::new();
    while let Some(answer) = answers.message().await.unwrap() {
        assert!(by_id.insert(answer.id, answer.result.unwrap()).is_none(), "one answer per id");
    }
    assert_eq!(by_id.len(), 5);
    let failure = |id| match &by_id[&id] {
        Answer::Failure(f) => f.clone(),
        other => panic!("append {id} should have failed: {other:?}"),
    };
    assert!(matches!(&by_id[&1], Answer::Appended(done) if done.stream_version == 1));
    let stale = failure(2);
    assert_eq!((Code::from(stale.code), stale.actual_version), (Code::FailedPrecondition, 1));
    assert!(stale.message.contains("expected version 5, actual version 1"), "{}", stale.message);
    let no_stream = failure(3);
    assert_eq!((Code::from(no_stream.code), no_stream.message.as_str()), (Code::InvalidArgument, "stream: must not be empty"));
    let missing = failure(4);
    assert_eq!((Code::from(missing.code), missing.message.as_str()), (Code::InvalidArgument, "append: missing"));
    assert!(matches!(&by_id[&5], Answer::Appended(done) if done.stream_version == 2));
    // Nothing of the failed appends was written.
    assert_eq!(total_events(&mut t.clients).await, 2);
    // Each append is counted once, by outcome, as a unary one would be.
    let metrics = common::http_get(t.node.metrics_addr.unwrap(), "/metrics");
    for line in [
        "anthill_append_requests_total{outcome=\"ok\"} 2",
        "anthill_append_requests_total{outcome=\"wrong_expected_version\"} 1",
        "anthill_append_requests_total{outcome=\"invalid\"} 2",
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_an_open_session_when_the_node_stops_then_it_answers_what_it_took_and_ends_with_unavailable() {
    let mut t = start(&[]).await;
    let (tx, mut answers) = open(&mut t).await;
    tx.send(request(0, append("s", None, vec![event("A", "")]))).await.unwrap();
    assert!(matches!(next_answer(&mut answers).await.result, Some(Answer::Appended(_))));
    // Appends still in flight when the stop comes: each is either answered or was never taken.
    for id in 1..=200 {
        tx.send(request(id, append("s", None, vec![event("A", "")]))).await.unwrap();
    }
    let node = t.node;
    let stopping = tokio::task::spawn_blocking(move || node.terminate(Duration::from_secs(30)));
    let started = std::time::Instant::now();
    let mut appended = 1;
    // The request side stays open: the node itself ends the call.
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(20), answers.message()).await.expect("the call ends") {
            Ok(Some(answer)) => match answer.result {
                Some(Answer::Appended(_)) => appended += 1,
                other => panic!("append {} failed: {other:?}", answer.id),
            },
            Ok(None) => panic!("the call ended with OK while the client was still sending"),
            Err(status) => break status,
        }
    };
    assert_eq!((end.code(), end.message()), (Code::Unavailable, "the node is shutting down"));
    // Ended by the node itself, not cut off at the end of the shutdown grace period (5 s).
    assert!(started.elapsed() < Duration::from_secs(4), "the call ended after {:?}", started.elapsed());
    stopping.await.unwrap().unwrap();
    drop(tx);
    // Exactly the answered appends are stored: nothing taken was left unanswered.
    let (node, mut clients) = common::start_in(&t.dir.path().join("node"), &[]).await;
    assert_eq!(total_events(&mut clients).await, appended);
    node.terminate(Duration::from_secs(20)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_request_over_the_size_limit_then_the_call_ends_with_an_error_after_answering_what_it_took() {
    let mut t = start(&["--max-request-bytes", "1048576", "--max-event-bytes", "1000"]).await;
    let (tx, mut answers) = open(&mut t).await;
    tx.send(request(1, append("s", None, vec![event("Small", "ok")]))).await.unwrap();
    assert!(matches!(next_answer(&mut answers).await.result, Some(Answer::Appended(_))));
    tx.send(request(2, append("s", None, vec![event("Huge", &"x".repeat(2 << 20))]))).await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(20), answers.message()).await.expect("the call ends");
    let status = end.expect_err("a request the node cannot read ends the call with an error, not OK");
    assert!(status.message().contains("append session request stream"), "{status:?}");
    assert_eq!(total_events(&mut t.clients).await, 1);
}
