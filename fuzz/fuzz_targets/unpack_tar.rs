//! The agent's unpacker fed a tar that is always validly gzipped, so that
//! mutations reach the tar reader and the entry checks instead of mostly
//! breaking the gzip stream.
#![no_main]

use std::io::Write;

use flate2::write::GzEncoder;
use flate2::Compression;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut gz = GzEncoder::new(Vec::with_capacity(data.len() / 2), Compression::fast());
    gz.write_all(data).expect("gzip into memory");
    let gz = gz.finish().expect("gzip into memory");
    rollwave_fuzz::stage_and_check(&gz);
});
