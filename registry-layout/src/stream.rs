//! Byte streams between files and the registry, one chunk in memory at a time.

use std::path::Path;

use futures::stream::{self, StreamExt};
use registry_core::{ByteStream, Digest, Hasher};

use crate::LayoutError;

/// Chunk size for reading blob files: large enough that the per-chunk overhead of the
/// registry's upload path does not show, small enough that memory stays flat.
const CHUNK: usize = 256 * 1024;

/// Opens a blob file as a stream of chunks.
pub(crate) async fn file_stream(path: &Path) -> Result<ByteStream, LayoutError> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| LayoutError::io(path, e))?;
    Ok(tokio_util::io::ReaderStream::with_capacity(file, CHUNK).boxed())
}

/// Why a stream was cut short by [`checked`]: carried inside the `io::Error` so that
/// the caller can tell it from a failure of the storage or of the file.
#[derive(Debug)]
pub(crate) struct Mismatch(pub(crate) String);

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Mismatch {}

/// The [`Mismatch`] inside an I/O error, if that is what it is.
pub(crate) fn mismatch_of(e: &std::io::Error) -> Option<String> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<Mismatch>())
        .map(|m| m.0.clone())
}

fn mismatch(reason: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, Mismatch(reason))
}

/// Passes `inner` through, failing it if it yields more or fewer than `size` bytes and,
/// with `hash`, if the bytes do not hash to `digest`. Registries that verify their own
/// reads already hash; a second hash is only worth its CPU when they do not.
pub(crate) fn checked(inner: ByteStream, digest: Digest, size: u64, hash: bool) -> ByteStream {
    struct State {
        inner: ByteStream,
        seen: u64,
        hasher: Option<Hasher>,
        done: bool,
    }
    let state = State {
        hasher: hash.then(|| Hasher::new(digest.algorithm())),
        inner,
        seen: 0,
        done: false,
    };
    stream::unfold(state, move |mut s| {
        let digest = digest.clone();
        async move {
            if s.done {
                return None;
            }
            match s.inner.next().await {
                Some(Ok(chunk)) => {
                    s.seen += chunk.len() as u64;
                    if s.seen > size {
                        s.done = true;
                        let e =
                            mismatch(format!("more than the {size} bytes its descriptor gives"));
                        return Some((Err(e), s));
                    }
                    if let Some(h) = s.hasher.as_mut() {
                        h.update(&chunk);
                    }
                    Some((Ok(chunk), s))
                }
                Some(Err(e)) => {
                    s.done = true;
                    Some((Err(e), s))
                }
                None => {
                    s.done = true;
                    if s.seen != size {
                        let e = mismatch(format!(
                            "{} bytes, not the {size} its descriptor gives",
                            s.seen
                        ));
                        return Some((Err(e), s));
                    }
                    match s.hasher.take().map(Hasher::finish) {
                        Some(actual) if actual != digest => {
                            Some((Err(mismatch(format!("content hashing to {actual}"))), s))
                        }
                        _ => None,
                    }
                }
            }
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    async fn drain(s: ByteStream) -> Result<u64, String> {
        let mut s = s;
        let mut n = 0;
        while let Some(c) = s.next().await {
            match c {
                Ok(c) => n += c.len() as u64,
                Err(e) => return Err(mismatch_of(&e).unwrap_or_else(|| e.to_string())),
            }
        }
        Ok(n)
    }

    fn body(parts: &[&'static [u8]]) -> ByteStream {
        let parts: Vec<std::io::Result<Bytes>> =
            parts.iter().map(|p| Ok(Bytes::from_static(p))).collect();
        stream::iter(parts).boxed()
    }

    #[tokio::test]
    async fn sizes_and_digests_are_checked() {
        let d = Digest::sha256(b"hello world");
        assert_eq!(
            drain(checked(body(&[b"hello", b" world"]), d.clone(), 11, true)).await,
            Ok(11)
        );
        assert!(
            drain(checked(body(&[b"hello"]), d.clone(), 11, true))
                .await
                .is_err()
        );
        assert!(
            drain(checked(body(&[b"hello world!"]), d.clone(), 11, false))
                .await
                .is_err()
        );
        assert!(
            drain(checked(body(&[b"hello World"]), d.clone(), 11, true))
                .await
                .is_err()
        );
        assert_eq!(
            drain(checked(body(&[b"hello World"]), d, 11, false)).await,
            Ok(11)
        );
    }
}
