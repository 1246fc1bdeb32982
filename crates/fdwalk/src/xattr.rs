//! Reading all extended attributes of an inode, through a descriptor or a `/proc/self/fd`
//! link (see the crate documentation for why the link is safe).

use std::ffi::CString;
use std::fs::File;

use rustix::io::{Errno, Result};

/// How the attributes are reached.
pub(crate) trait Source {
    fn list(&self, buf: &mut [u8]) -> Result<usize>;
    fn list_len(&self) -> Result<usize>;
    fn get(&self, name: &CString, buf: &mut [u8]) -> Result<usize>;
    fn get_len(&self, name: &CString) -> Result<usize>;
}

/// A descriptor open for reading (regular files, directories).
pub(crate) struct ByFd<'a>(pub &'a File);

impl Source for ByFd<'_> {
    fn list(&self, buf: &mut [u8]) -> Result<usize> {
        rustix::fs::flistxattr(self.0, buf)
    }
    fn list_len(&self) -> Result<usize> {
        rustix::fs::flistxattr_query(self.0)
    }
    fn get(&self, name: &CString, buf: &mut [u8]) -> Result<usize> {
        rustix::fs::fgetxattr(self.0, name.as_c_str(), buf)
    }
    fn get_len(&self, name: &CString) -> Result<usize> {
        rustix::fs::fgetxattr_query(self.0, name.as_c_str())
    }
}

/// `/proc/self/fd/N` of an `O_PATH` handle, followed (the magic link jumps to the handle's
/// inode and goes no further).
pub(crate) struct ByProcLink<'a>(pub &'a str);

impl Source for ByProcLink<'_> {
    fn list(&self, buf: &mut [u8]) -> Result<usize> {
        rustix::fs::listxattr(self.0, buf)
    }
    fn list_len(&self) -> Result<usize> {
        rustix::fs::listxattr_query(self.0)
    }
    fn get(&self, name: &CString, buf: &mut [u8]) -> Result<usize> {
        rustix::fs::getxattr(self.0, name.as_c_str(), buf)
    }
    fn get_len(&self, name: &CString) -> Result<usize> {
        rustix::fs::getxattr_query(self.0, name.as_c_str())
    }
}

/// Every attribute. A name whose value disappears between the list and the read is left
/// out; a filesystem without attributes has none. Buffers grow to what the kernel says
/// (attribute lists and values are at most 64 KiB each).
pub(crate) fn read(src: &dyn Source) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut names = vec![0u8; 4096];
    let n = loop {
        match src.list(&mut names) {
            Ok(n) => break n,
            Err(Errno::RANGE) => {
                let need = src.list_len()?;
                names.resize(need.max(names.len() * 2), 0);
            }
            Err(Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        }
    };
    let mut out = Vec::new();
    for name in names[..n].split(|&c| c == 0).filter(|n| !n.is_empty()) {
        // Split on NUL, so there is none inside.
        let Ok(cname) = CString::new(name) else {
            continue;
        };
        let mut value = vec![0u8; 256];
        let got = loop {
            match src.get(&cname, &mut value) {
                Ok(k) => break Some(k),
                Err(Errno::RANGE) => {
                    let need = src.get_len(&cname)?;
                    value.resize(need.max(value.len() * 2), 0);
                }
                // Removed between the list and the read.
                Err(Errno::NODATA) => break None,
                Err(e) => return Err(e),
            }
        };
        if let Some(k) = got {
            value.truncate(k);
            out.push((name.to_vec(), value));
        }
    }
    Ok(out)
}
