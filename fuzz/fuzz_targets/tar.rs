//! The tar parser on arbitrary bytes. Errors are fine; panics, hangs and unbounded memory are
//! bugs.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = erofs_image::tar::TarReader::new(data);
    let mut buf = [0u8; 4096];
    while let Ok(Some(_entry)) = r.next_entry() {
        while let Ok(n) = r.read_data(&mut buf) {
            if n == 0 {
                break;
            }
        }
    }
    let _ = r.drain();
});
