//! The checker on structured images: the generator builds a tree as a builder would, then
//! twists it (overlapping metadata, huge directories, bad ids, filters, flipped bytes) as the
//! input says. The check must stay within its work budget and findings cap, and accept every
//! image the generator left untwisted.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../../crates/erofs-image/tests/image/imagegen.rs"]
mod imagegen;

fuzz_target!(|data: &[u8]| {
    let g = imagegen::image(&mut imagegen::Src::new(data));
    let r = erofs_image::check::check_image(g.image, Vec::new());
    assert!(r.findings.len() <= erofs_image::check::MAX_FINDINGS + 1);
    assert!(r.work <= r.work_budget + (1 << 19), "work {} of {}", r.work, r.work_budget);
    if g.clean {
        assert!(r.is_ok(), "a clean generated image fails: {:?}", r.findings);
    }
});
