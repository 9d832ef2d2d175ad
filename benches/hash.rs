//! Consistent-hash costs: key → backend lookup for 10 and 1,000 backends (with the key hashed in
//! the loop, and already hashed), bounded-load picks, and table build time for 1,000 backends.
//!
//! Run: `cargo bench --bench hash`.

use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use writegate::balance::{ketama, rendezvous, Balancer};
use writegate::config::{BackendConfig, HashAlgorithm, HashConfig, UpstreamConfig};
use writegate::upstream::{Backend, Member};

fn labels(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("10.0.{}.{}:8080", i / 250, i % 250 + 1))
        .collect()
}

fn keys() -> Vec<String> {
    (0..4096).map(|i| format!("user:{}", i * 7919)).collect()
}

fn upstream(n: usize, algorithm: HashAlgorithm, factor: Option<f64>) -> (Balancer, Vec<Member>) {
    let backends: Vec<BackendConfig> = labels(n)
        .into_iter()
        .map(|label| BackendConfig {
            address: label.parse().expect("address"),
            label,
            weight: NonZeroU32::MIN,
            down: false,
            max_inflight: None,
            tls_name: None,
        })
        .collect();
    let members: Vec<Member> = backends
        .iter()
        .map(|b| Member::new(Arc::new(Backend::new(b.address, &b.label)), 1, "bench"))
        .collect();
    let config = UpstreamConfig {
        name: "bench".into(),
        consistent_hash: Some(HashConfig {
            algorithm,
            balance_factor: factor,
            balance_min_inflight: 0,
        }),
        backends,
        discovery: None,
        max_inflight_per_backend: None,
        admission: None,
        outlier: Default::default(),
        health_check: None,
        tls_ca: None,
    };
    (Balancer::new(&config, &members), members)
}

fn lookups(c: &mut Criterion) {
    let keys = keys();
    for n in [10, 1000] {
        let names = labels(n);
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let table = rendezvous::Table::build(&refs, &vec![1; n]);
        let ring = ketama::Ring::build(&refs, &vec![1; n]);
        let hashes: Vec<u64> = keys
            .iter()
            .map(|k| rendezvous::key_hash(k.as_bytes()))
            .collect();
        let crcs: Vec<u32> = keys
            .iter()
            .map(|k| ketama::key_hash(k.as_bytes()))
            .collect();
        let mut i = 0;
        c.bench_function(&format!("rendezvous/{n} backends/prehashed"), |b| {
            b.iter(|| {
                i = (i + 1) & 4095;
                black_box(table.primary(black_box(hashes[i])))
            })
        });
        c.bench_function(&format!("rendezvous/{n} backends/with key hash"), |b| {
            b.iter(|| {
                i = (i + 1) & 4095;
                black_box(table.primary(rendezvous::key_hash(black_box(keys[i].as_bytes()))))
            })
        });
        c.bench_function(&format!("ketama/{n} backends/prehashed"), |b| {
            b.iter(|| {
                i = (i + 1) & 4095;
                black_box(ring.primary(black_box(crcs[i])))
            })
        });
        for (name, factor) in [("pick", None), ("pick, bounded loads", Some(1.25))] {
            let (balancer, members) = upstream(n, HashAlgorithm::Rendezvous, factor);
            c.bench_function(&format!("rendezvous/{n} backends/{name}"), |b| {
                b.iter(|| {
                    i = (i + 1) & 4095;
                    black_box(balancer.pick(
                        &members,
                        balancer.hash_key(keys[i].as_bytes()),
                        0,
                        |_| true,
                    ))
                })
            });
        }
    }
}

fn builds(c: &mut Criterion) {
    let mut group = c.benchmark_group("build");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    let names = labels(1000);
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let equal = vec![1u32; 1000];
    let mut mixed = equal.clone();
    for w in mixed.iter_mut().step_by(3) {
        *w = 2;
    }
    group.bench_function("rendezvous/1000 backends/equal weights", |b| {
        b.iter(|| rendezvous::Table::build(black_box(&refs), &equal))
    });
    group.bench_function("rendezvous/1000 backends/weights 1 and 2", |b| {
        b.iter(|| rendezvous::Table::build(black_box(&refs), &mixed))
    });
    group.bench_function("ketama/1000 backends", |b| {
        b.iter(|| ketama::Ring::build(black_box(&refs), &equal))
    });
    group.finish();
}

criterion_group!(benches, lookups, builds);
criterion_main!(benches);
