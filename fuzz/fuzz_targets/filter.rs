//! containerd filter strings (one per line, as a request's repeated `filters` field) through
//! the parser, the regular expression translation and matching. Parse errors are fine;
//! panics, hangs and runaway memory are bugs. The body lives in the snapshotter crate
//! (`filter::fuzz_filters`) so that its own tests cover and type-check it.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| snapshotter::filter::fuzz_filters(data));
