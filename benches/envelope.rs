//! Micro-benchmarks of the per-message CPU path: parse + validate a client frame, dispatch it to
//! a stored body, and build the delivery frame every member receives.
//!
//! `cargo bench --bench envelope`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;

use chat_relay::dispatch::{dispatch, Action, ConnCtx, RolePolicy, StoreEnvelope};
use chat_relay::protocol::{ack_frame, delivery_frame, parse_client_frame, Limits, StreamId};

fn frame(text_len: usize) -> String {
    let text = "가나다 hello 🎉 ".repeat(text_len / 20 + 1);
    serde_json::json!({
        "hd": {"event": "chat.message", "role": "A", "cid": "c-123456", "timestamp": "2024-01-01T00:00:00Z"},
        "bd": {"text": text.chars().take(text_len).collect::<String>()},
    })
    .to_string()
}

fn benches(c: &mut Criterion) {
    let limits = Limits::default();
    let roles = RolePolicy::new(&["A".into(), "B".into(), "user".into()]);
    let ctx = ConnCtx::new("room001", Some("A".into()));
    for size in [64usize, 256, 1900] {
        let text = frame(size);
        let mut g = c.benchmark_group(format!("envelope_{size}"));
        g.throughput(Throughput::Bytes(text.len() as u64));
        g.bench_function("parse_validate", |b| {
            b.iter(|| parse_client_frame(black_box(&text), &limits))
        });
        g.bench_function("parse_dispatch", |b| {
            b.iter(|| {
                let inbound = parse_client_frame(black_box(&text), &limits).ok()?;
                dispatch(inbound, &ctx, &roles).ok()
            })
        });
        let Ok(inbound) = parse_client_frame(&text, &limits) else {
            panic!("benchmark frame must be valid");
        };
        let Ok(Action::Store(StoreEnvelope { body, .. })) = dispatch(inbound, &ctx, &roles) else {
            panic!("benchmark frame must be stored");
        };
        let id = StreamId::new(1_700_000_000_000, 7);
        g.bench_function("delivery_frame", |b| {
            b.iter(|| delivery_frame(black_box(id), "A", "chat.message", black_box(&body)))
        });
        g.bench_function("ack_frame", |b| {
            b.iter(|| ack_frame(Some(black_box("c-123456")), id))
        });
        g.finish();
    }
    // The usual header: event, role and cid only (what browsers and the load generator send).
    let plain = serde_json::json!({
        "hd": {"event": "chat.message", "role": "A", "cid": "c-123456"},
        "bd": {"text": "hello ".repeat(43), "seq": 17},
    })
    .to_string();
    c.bench_function("parse_validate_plain_header_256", |b| {
        b.iter(|| parse_client_frame(black_box(&plain), &limits))
    });
    c.bench_function("parse_dispatch_plain_header_256", |b| {
        b.iter(|| {
            let inbound = parse_client_frame(black_box(&plain), &limits).ok()?;
            dispatch(inbound, &ctx, &roles).ok()
        })
    });
    c.bench_function("refuse_bad_json", |b| {
        b.iter(|| {
            parse_client_frame(
                black_box("{\"hd\": {\"event\": \"chat.message\"} oops"),
                &limits,
            )
        })
    });
}

criterion_group!(envelope, benches);
criterion_main!(envelope);
