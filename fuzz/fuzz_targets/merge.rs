//! fsmeta from two structured, possibly hostile, layers (see `merge_generated` in the
//! erofs-image merge tests): an fsmeta that passes the checker or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../../crates/erofs-image/tests/image/imagegen.rs"]
mod imagegen;

mod crate_common {}

fuzz_target!(|data: &[u8]| {
    use erofs_image::merge::{MergeOptions, merge_layers};
    let (a, b) = data.split_at(data.len() / 2);
    let base = imagegen::image(&mut imagegen::Src::new(a));
    let top = imagegen::image(&mut imagegen::Src::new(b));
    let layers = [base.image, top.image];
    let Ok(images) = layers
        .iter()
        .map(|l| erofs_image::Image::open(l.clone()))
        .collect::<Result<Vec<_>, _>>()
    else {
        return;
    };
    let mut out = Vec::new();
    match merge_layers(&images, &mut out, &MergeOptions::default()) {
        Ok(_) => {
            let devices = layers
                .iter()
                .map(|l| Box::new(l.clone()) as Box<dyn erofs_image::ReadAt>)
                .collect();
            let r = erofs_image::check::check_image(out, devices);
            assert!(r.is_ok(), "fsmeta of generated layers: {}", r.summary(5));
        }
        Err(e) => assert!(!(base.clean && top.clean), "clean layers refused: {e}"),
    }
});
