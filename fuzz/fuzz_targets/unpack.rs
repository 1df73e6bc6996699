//! The agent's unpacker fed a tar.gz as downloaded: anything from a valid
//! archive to a corrupt gzip stream.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    rollwave_fuzz::stage_and_check(data);
});
