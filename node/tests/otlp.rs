//! Spans reach a real OTLP/gRPC collector when `telemetry.otlp_endpoint` is set: the test runs a
//! collector (the OpenTelemetry TraceService over tonic) on loopback and points a node at it.

mod common;

use std::sync::Arc;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use parking_lot::Mutex;
use tonic::{Request, Response, Status};

#[derive(Clone, Default)]
struct Collector {
    requests: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(&self, request: Request<ExportTraceServiceRequest>) -> Result<Response<ExportTraceServiceResponse>, Status> {
        self.requests.lock().push(request.into_inner());
        Ok(Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

fn string_attr(attrs: &[opentelemetry_proto::tonic::common::v1::KeyValue], key: &str) -> Option<String> {
    attrs.iter().find(|kv| kv.key == key).and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
        Value::StringValue(s) => Some(s.clone()),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_an_otlp_endpoint_then_append_spans_are_exported_with_the_service_name() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let endpoint = format!("http://{addr}");
    let mut t = common::start(&["--otlp-endpoint", &endpoint, "--service-name", "anthill-test", "--log-level", "info"]).await;
    for i in 0..3 {
        t.clients.log.append(common::append("traced", None, vec![common::event("T", &i.to_string())])).await.unwrap();
    }
    // A clean stop flushes the spans still waiting in the batch exporter.
    drop(t.clients);
    tokio::task::spawn_blocking(move || t.node.terminate(Duration::from_secs(30))).await.unwrap().unwrap();

    let requests = collector.requests.lock().clone();
    let resource_spans: Vec<_> = requests.iter().flat_map(|r| r.resource_spans.iter()).collect();
    assert!(!resource_spans.is_empty(), "the collector received nothing");
    let service = resource_spans[0].resource.as_ref().and_then(|r| string_attr(&r.attributes, "service.name"));
    assert_eq!(service.as_deref(), Some("anthill-test"));
    let appends: Vec<_> = resource_spans
        .iter()
        .flat_map(|rs| rs.scope_spans.iter().flat_map(|ss| ss.spans.iter()))
        .filter(|span| span.name == "append")
        .collect();
    assert_eq!(appends.len(), 3, "append spans: {appends:?}");
    assert!(appends.iter().all(|s| string_attr(&s.attributes, "stream").as_deref() == Some("traced")));
    server.abort();
}
