//! What checking a release costs an agent, for a 100 MB artifact: the
//! sha256 it computes while downloading, then the minisign signature it
//! verifies over the downloaded file (BLAKE2b-512 of the bytes, two Ed25519
//! checks), beside the floor no check can beat: copying the same bytes in
//! memory and reading them back from the page cache.
//!
//! Run with `cargo bench -p rollwave-agent --bench verify [-- --mb 100]`.

use std::hint::black_box;
use std::io::Read;
use std::time::{Duration, Instant};

use rollwave_agent::artifact::{sha256_file, verify_signature};
use rollwave_core::signing::trusted_comment;
use rollwave_core::{TrustedKey, TrustedKeys};
use sha2::{Digest, Sha256};

const RUNS: usize = 5;

/// Median and fastest of `RUNS` runs.
fn time<T>(mut f: impl FnMut() -> T) -> (Duration, Duration) {
    let mut samples: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            black_box(f());
            t.elapsed()
        })
        .collect();
    samples.sort();
    (samples[RUNS / 2], samples[0])
}

/// Bytes that neither compress nor repeat, cheaply.
fn artifact(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut mb: usize = 100;
    while let Some(a) = args.next() {
        if a == "--mb" {
            mb = args
                .next()
                .and_then(|v| v.parse().ok())
                .expect("--mb takes a number of megabytes");
        }
    }
    let len = mb * 1_000_000;
    let bytes = artifact(len);
    let dir = tempfile::tempdir().expect("creating a temporary directory");
    let path = dir.path().join("api-2.0.0.tar.gz");
    std::fs::write(&path, &bytes).expect("writing the artifact");

    let minisign::KeyPair { pk, sk } =
        minisign::KeyPair::generate_unencrypted_keypair().expect("generating a key");
    let sha = hex::encode(Sha256::digest(&bytes));
    let comment = trusted_comment("api", "2.0.0", &sha);
    let signature = minisign::sign(Some(&pk), &sk, &bytes[..], Some(&comment), None)
        .expect("signing")
        .into_string();
    let keys = TrustedKeys::new(vec![
        TrustedKey::from_base64(&pk.to_base64()).expect("reading the key")
    ])
    .expect("one key");

    let mut copy = vec![0u8; len];
    let memcpy = time(|| copy.copy_from_slice(&bytes));
    let read = time(|| {
        let mut f = std::fs::File::open(&path).expect("opening the artifact");
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0;
        loop {
            match f.read(&mut buf).expect("reading the artifact") {
                0 => break n,
                k => n += k,
            }
        }
    });
    let sha_mem = time(|| {
        // As the download does: chunk by chunk as they arrive.
        let mut h = Sha256::new();
        for chunk in bytes.chunks(64 * 1024) {
            h.update(chunk);
        }
        h.finalize()
    });
    let sig_mem = time(|| {
        keys.verify(Some(&signature), &bytes, "api", "2.0.0")
            .expect("the signature verifies")
    });
    let sha_file = time(|| sha256_file(&path).expect("hashing the artifact"));
    let sig_file = time(|| {
        verify_signature(&path, &[&signature], &keys, "api", "2.0.0")
            .expect("the signature verifies")
    });
    // What an agent with trusted keys does per artifact beyond receiving it:
    // sha256 of the chunks as they arrive, then the signature over the file.
    let both = time(|| {
        let mut h = Sha256::new();
        for chunk in bytes.chunks(64 * 1024) {
            h.update(chunk);
        }
        black_box(h.finalize());
        verify_signature(&path, &[&signature], &keys, "api", "2.0.0")
            .expect("the signature verifies")
    });
    let empty = minisign::sign(Some(&pk), &sk, &b""[..], Some(&comment), None)
        .expect("signing")
        .into_string();
    let fixed = time(|| {
        keys.verify(Some(&empty), b"", "api", "2.0.0")
            .expect("the signature verifies")
    });

    let rate = |d: Duration| len as f64 / 1e6 / d.as_secs_f64();
    println!("verifying a {mb} MB release, median (fastest) of {RUNS} runs");
    println!("{:<52} {:>16} {:>20}", "", "time", "throughput");
    let row = |name: &str, (median, fastest): (Duration, Duration)| {
        println!(
            "{name:<52} {:>7.1} ms ({:>5.1}) {:>8.0} MB/s ({:>5.0})",
            median.as_secs_f64() * 1e3,
            fastest.as_secs_f64() * 1e3,
            rate(median),
            rate(fastest)
        );
    };
    println!("ideal");
    row("  memcpy of the buffer", memcpy);
    row("  read of the file (page cache)", read);
    println!("checks");
    row("  sha256, in memory (as while downloading)", sha_mem);
    row("  sha256 of the file", sha_file);
    row("  signature, in memory (BLAKE2b-512 + Ed25519)", sig_mem);
    row("  signature of the file (verify_signature)", sig_file);
    row("  sha256 while downloading + signature of the file", both);
    println!(
        "  parsing and the two Ed25519 checks alone (an empty artifact): {:.3} ms",
        fixed.0.as_secs_f64() * 1e3
    );
    println!(
        "the signature adds {:.0} ms to sha256's {:.0} ms ({:.1}x the time of sha256 alone); reading the file again for it is {:.0} ms of that",
        (both.0.saturating_sub(sha_mem.0)).as_secs_f64() * 1e3,
        sha_mem.0.as_secs_f64() * 1e3,
        both.0.as_secs_f64() / sha_mem.0.as_secs_f64(),
        read.0.as_secs_f64() * 1e3,
    );
}
