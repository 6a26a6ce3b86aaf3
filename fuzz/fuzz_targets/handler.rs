//! libFuzzer target: the orchestrator's request handler on arbitrary requests.
//! See `../README.md` for how to run it; the case itself is `../harness.rs`.
#![no_main]

#[path = "../harness.rs"]
mod harness;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime");
    if let Err(problem) = runtime.block_on(harness::check(data)) {
        panic!("{problem}");
    }
});
