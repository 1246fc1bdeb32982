//! Decompression on a second thread, so unpacking uses both cores: one thread only
//! decompresses (the bottleneck for gzip layers), the other hashes the uncompressed stream
//! (the layer's diffID), parses the tar and writes the image. Buffers are bounded (8 x 256 KiB
//! in flight: larger chunks gain no throughput and cost peak memory).

use std::io::{self, Read};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use sha2::{Digest, Sha256};

const CHUNK: usize = 256 << 10;
const DEPTH: usize = 8;

/// What the producer thread saw in total.
#[derive(Debug, Clone)]
pub struct StreamSummary {
    /// sha256 of every uncompressed byte.
    pub digest: String,
    /// Uncompressed bytes.
    pub size: u64,
}

/// The consumer side: a `Read` of the uncompressed stream.
pub struct Pipeline {
    rx: Receiver<io::Result<Vec<u8>>>,
    cur: Vec<u8>,
    pos: usize,
    done: bool,
    /// The kind of the error already handed to the consumer: later reads fail too, instead of
    /// looking like the end of the stream.
    failed: Option<io::ErrorKind>,
    handle: Option<JoinHandle<()>>,
    recycle: SyncSender<Vec<u8>>,
    hasher: Sha256,
    size: u64,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pipeline")
    }
}

impl Pipeline {
    /// Start reading `src` (already decompressing) on a new thread.
    pub fn start(mut src: Box<dyn Read + Send>) -> Self {
        let (tx, rx) = sync_channel::<io::Result<Vec<u8>>>(DEPTH);
        let (recycle, spare) = sync_channel::<Vec<u8>>(DEPTH + 2);
        let handle = std::thread::Builder::new()
            .name("layer-decompress".into())
            .spawn(move || {
                loop {
                    let mut buf = spare
                        .try_recv()
                        .unwrap_or_else(|_| Vec::with_capacity(CHUNK));
                    buf.resize(CHUNK, 0);
                    let mut n = 0;
                    // Fill whole chunks: decoders return small reads.
                    while n < CHUNK {
                        match src.read(&mut buf[n..]) {
                            Ok(0) => break,
                            Ok(k) => n += k,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => {
                                // The consumer gets the error itself (its source chain too).
                                let _ = tx.send(Err(e));
                                return;
                            }
                        }
                    }
                    buf.truncate(n);
                    if n == 0 {
                        break;
                    }
                    if tx.send(Ok(buf)).is_err() {
                        // The consumer stopped (an error on its side); stop too.
                        break;
                    }
                }
            })
            .expect("spawning the decompression thread");
        Pipeline {
            rx,
            cur: Vec::new(),
            pos: 0,
            done: false,
            failed: None,
            handle: Some(handle),
            recycle,
            hasher: Sha256::new(),
            size: 0,
        }
    }

    /// Read everything left (so the digest covers the whole stream) and return the summary.
    pub fn finish(mut self) -> io::Result<StreamSummary> {
        io::copy(&mut self, &mut io::sink())?;
        let h = self.handle.take().expect("joined once");
        let summary = StreamSummary {
            digest: format!(
                "sha256:{}",
                hex::encode(std::mem::take(&mut self.hasher).finalize())
            ),
            size: self.size,
        };
        drop(self);
        h.join()
            .map_err(|_| io::Error::other("decompression thread panicked"))?;
        Ok(summary)
    }
}

impl Read for Pipeline {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            if let Some(kind) = self.failed {
                return Err(io::Error::new(kind, "the layer stream failed earlier"));
            }
            if self.done {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Ok(buf)) => {
                    // Hashing here keeps the decompression thread free for decompressing.
                    self.hasher.update(&buf);
                    self.size += buf.len() as u64;
                    let old = std::mem::replace(&mut self.cur, buf);
                    let _ = self.recycle.try_send(old);
                    self.pos = 0;
                }
                Ok(Err(e)) => {
                    self.failed = Some(e.kind());
                    return Err(e);
                }
                Err(_) => {
                    self.done = true;
                    return Ok(0);
                }
            }
        }
        let n = out.len().min(self.cur.len() - self.pos);
        out[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_bytes_and_hashes_them() {
        let data: Vec<u8> = (0..5_000_000u32).map(|i| (i * 7) as u8).collect();
        let mut p = Pipeline::start(Box::new(io::Cursor::new(data.clone())));
        let mut first = vec![0u8; 1234];
        p.read_exact(&mut first).unwrap();
        assert_eq!(first, data[..1234]);
        let s = p.finish().unwrap();
        assert_eq!(s.size, data.len() as u64);
        assert_eq!(
            s.digest,
            format!("sha256:{}", hex::encode(Sha256::digest(&data)))
        );
    }

    #[test]
    fn errors_reach_the_consumer() {
        struct Fail;
        impl Read for Fail {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::new(io::ErrorKind::InvalidData, "corrupt gzip"))
            }
        }
        let mut p = Pipeline::start(Box::new(Fail));
        let e = p.read(&mut [0u8; 10]).unwrap_err();
        assert!(e.to_string().contains("corrupt gzip"));
        // The original error, not a copy of its message.
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.get_ref().is_some());
        // Neither a later read nor finish() takes the failure for the end of the stream.
        assert!(p.read(&mut [0u8; 10]).is_err());
        assert!(p.finish().is_err());
    }
}
