//! Build images from arbitrary tars, then read them back: a tar we accept must give an image
//! our checker accepts.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let opts = erofs_image::BuildOptions { oci_whiteouts: data.first().is_some_and(|b| b & 1 == 1), ..Default::default() };
    let mut out = std::io::Cursor::new(Vec::new());
    if erofs_image::tar_to_image(data, &mut out, &opts).is_ok() {
        let img = erofs_image::Image::open(out.into_inner()).expect("our own image must open");
        let report = erofs_image::check::check(&img);
        assert!(report.is_ok(), "our own image fails the checker: {:?}", report.findings);
    }
    if let Ok(idx) = erofs_image::tar_to_index(data, std::io::sink(), &opts) {
        let mut flat = idx.index.clone();
        flat.extend_from_slice(data);
        let img = erofs_image::Image::open(flat).expect("our own index must open");
        let report = erofs_image::check::check(&img);
        assert!(report.is_ok(), "our own index fails the checker: {:?}", report.findings);
    }
});
