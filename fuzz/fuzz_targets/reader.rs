//! The image reader and the checker on arbitrary bytes. Errors are fine; panics, hangs and
//! out-of-bounds reads are bugs.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(img) = erofs_image::Image::open(data.to_vec()) else { return };
    let _ = erofs_image::check::check(&img);
    let mut budget = 10_000u32;
    let _ = img.walk(|_, ino| {
        budget = budget.checked_sub(1).ok_or(erofs_image::Error::TooLarge("fuzz budget".into()))?;
        let mut buf = [0u8; 8192];
        let _ = img.read(ino, 0, &mut buf);
        let _ = img.xattrs(ino);
        if ino.is_symlink() {
            let _ = img.read_link(ino);
        }
        Ok(())
    });
    let _ = erofs_image::debug::dump(&img);
});
