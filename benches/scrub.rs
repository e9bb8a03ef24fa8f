//! Throughput of the response-body scrubber, per core: plain JSON with no
//! token in it (the common case), JSON with a token every 4 KiB, URL
//! rewriting of a style document, and gzip decode → scrub → re-encode.
//!
//! `cargo bench --bench scrub`; figures go in BENCHMARKS.md.

use std::hint::black_box;

use arcgis_app_proxy::codec::{Coding, Decoder, Encoder};
use arcgis_app_proxy::scrub::{ScrubPatterns, Scrubber};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const TOKEN: &str = "3NKHt6i2urmWtqOuugvr9dS8eCT7iC5WT.fK9m-_qx1xO3GsY4pxkc8b2_LkE0vQz";

fn feature_json(with_tokens: bool) -> Vec<u8> {
    let mut out = String::from("{\"features\":[");
    let mut i = 0;
    while out.len() < 1024 * 1024 {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!(
            "{{\"attributes\":{{\"OBJECTID\":{i},\"NAME\":\"Feature number {i}\",\"TYPE\":\"park\"}},\"geometry\":{{\"x\":-118.{i:05},\"y\":34.{i:05}}}}}"
        ));
        if with_tokens && i % 32 == 0 {
            out.push_str(&format!(",{{\"url\":\"https://services.arcgis.com/x/FeatureServer/0?token={TOKEN}&f=json\"}}"));
        }
        i += 1;
    }
    out.push_str("]}");
    out.into_bytes()
}

fn run(scrubber: &mut Scrubber, data: &[u8], chunk: usize) -> usize {
    let mut n = 0;
    for piece in data.chunks(chunk) {
        n += scrubber.push(piece).len();
    }
    n + scrubber.finish().len()
}

fn bench(c: &mut Criterion) {
    let plain = feature_json(false);
    let tokens = feature_json(true);
    let secrets = [TOKEN, TOKEN];
    let rewrites = vec![(
        "https://services.arcgis.com/x".to_string(),
        "https://proxy.example.com/features".to_string(),
    )];

    let mut g = c.benchmark_group("scrub");
    g.throughput(Throughput::Bytes(plain.len() as u64));
    g.bench_function("json_no_token_16k_chunks", |b| {
        b.iter(|| {
            let mut s = Scrubber::new(&secrets, &[]).unwrap();
            black_box(run(&mut s, black_box(&plain), 16 * 1024))
        })
    });
    g.throughput(Throughput::Bytes(tokens.len() as u64));
    g.bench_function("json_token_every_4k_16k_chunks", |b| {
        b.iter(|| {
            let mut s = Scrubber::new(&secrets, &[]).unwrap();
            black_box(run(&mut s, black_box(&tokens), 16 * 1024))
        })
    });
    g.bench_function("json_token_and_rewrite_16k_chunks", |b| {
        b.iter(|| {
            let mut s = Scrubber::new(&secrets, &rewrites).unwrap();
            black_box(run(&mut s, black_box(&tokens), 16 * 1024))
        })
    });
    g.throughput(Throughput::Bytes(plain.len() as u64));
    g.bench_function("json_no_token_1k_chunks", |b| {
        b.iter(|| {
            let mut s = Scrubber::new(&secrets, &[]).unwrap();
            black_box(run(&mut s, black_box(&plain), 1024))
        })
    });

    // gzip: decode, scrub, re-encode (the cost a compressed answer adds).
    let mut enc = Encoder::new(Coding::Gzip);
    let mut gz = enc.push(&tokens).unwrap();
    gz.extend(enc.finish().unwrap());
    g.throughput(Throughput::Bytes(tokens.len() as u64));
    g.bench_function("gzip_decode_scrub_encode_16k_chunks", |b| {
        b.iter(|| {
            let mut d = Decoder::new(Coding::Gzip);
            let mut s = Scrubber::new(&secrets, &[]).unwrap();
            let mut e = Encoder::new(Coding::Gzip);
            let mut n = 0;
            for piece in gz.chunks(16 * 1024) {
                let plain = d.push(piece).unwrap();
                n += e.push(&s.push(&plain)).unwrap().len();
            }
            let mut rest = s.push(&d.finish().unwrap());
            rest.extend(s.finish());
            n += e.push(&rest).unwrap().len();
            n += e.finish().unwrap().len();
            black_box(n)
        })
    });
    // Per token (cached by the proxy): compiling the patterns.
    g.bench_function("patterns_compile_once_per_token", |b| {
        b.iter(|| {
            black_box(ScrubPatterns::new(
                black_box(&secrets),
                black_box(&["https://services.arcgis.com/x"]),
            ))
        })
    });
    // Per request: a scrubber over the cached patterns.
    let pats = ScrubPatterns::new(&secrets, &[]).unwrap();
    g.bench_function("scrubber_per_request", |b| {
        b.iter(|| black_box(Scrubber::with_patterns(black_box(pats.clone()), Vec::new())))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
