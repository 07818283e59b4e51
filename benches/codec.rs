//! Benchmarks of the X.224 codec: the per-probe encode and the Connection Confirm parse.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use rdphealth::probe::codec;

fn codec(c: &mut Criterion) {
    let ssl = codec::encode_negotiation_response(1, 1);
    let failure = codec::encode_negotiation_failure(3);
    let http = b"HTTP/1.1 400 Bad Request\r\n".to_vec();
    c.bench_function("encode_probe_request", |b| {
        b.iter(codec::probe_connection_request)
    });
    c.bench_function("parse_confirm_ssl", |b| {
        b.iter(|| codec::parse_connection_confirm(black_box(&ssl)))
    });
    c.bench_function("parse_confirm_failure", |b| {
        b.iter(|| codec::parse_connection_confirm(black_box(&failure)))
    });
    c.bench_function("parse_not_rdp", |b| {
        b.iter(|| codec::parse_connection_confirm(black_box(&http)))
    });
}

criterion_group!(benches, codec);
criterion_main!(benches);
