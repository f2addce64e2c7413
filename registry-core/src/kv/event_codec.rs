//! How an outbox entry is written: a compact binary record instead of JSON.
//!
//! Every change writes its events in its commit and every webhook or mirror reads them
//! back, so their encoding is on the path of each push. JSON through serde's internally
//! tagged enum (which buffers the whole event to find its `kind`) cost about 12,000
//! instructions per event read; this record is read field by field, straight from the
//! bytes.
//!
//! Layout: [`FORMAT`], the time (u64, little-endian), the kind (one byte, [`Kind`]),
//! then the kind's fields in their declared order: text as a u32 little-endian length
//! and its bytes, numbers as u64 little-endian, an optional digest as a presence byte
//! (0 or 1) and the digest, a list of tags as a u32 count and each tag. Names, tags and
//! digests are validated again when read, as JSON records were.
//!
//! Records written before this format are JSON objects; their first byte is `{`, never
//! [`FORMAT`], so both are read.

use super::decode;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::events::{Event, OutboxEntry};
use crate::names::{RepoName, Tag};
use crate::time::Timestamp;

/// First byte of a binary record (a JSON record starts with `{`).
const FORMAT: u8 = 1;

/// The byte that names an event's kind. Numbers are never reused: a record outlives the
/// process that wrote it.
#[repr(u8)]
#[derive(Clone, Copy)]
enum Kind {
    BlobStored = 1,
    BlobMounted = 2,
    BlobDeleted = 3,
    ManifestPut = 4,
    TagMoved = 5,
    TagDeleted = 6,
    ManifestDeleted = 7,
    LinkCollected = 8,
    RepositoryCreated = 9,
    RepositoryDeleted = 10,
    BlobCollected = 11,
}

impl Kind {
    fn of(byte: u8) -> Option<Kind> {
        use Kind::*;
        Some(match byte {
            1 => BlobStored,
            2 => BlobMounted,
            3 => BlobDeleted,
            4 => ManifestPut,
            5 => TagMoved,
            6 => TagDeleted,
            7 => ManifestDeleted,
            8 => LinkCollected,
            9 => RepositoryCreated,
            10 => RepositoryDeleted,
            11 => BlobCollected,
            _ => return None,
        })
    }
}

/// The record of an event made at `at`.
pub(super) fn encode_entry(at: Timestamp, event: &Event) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(160));
    w.0.push(FORMAT);
    w.u64(at.0);
    match event {
        Event::BlobStored { repo, digest, size } => {
            w.kind(Kind::BlobStored);
            w.text(repo.as_str());
            w.text(digest.as_str());
            w.u64(*size);
        }
        Event::BlobMounted { repo, from, digest } => {
            w.kind(Kind::BlobMounted);
            w.text(repo.as_str());
            w.text(from.as_str());
            w.text(digest.as_str());
        }
        Event::BlobDeleted { repo, digest } => {
            w.kind(Kind::BlobDeleted);
            w.text(repo.as_str());
            w.text(digest.as_str());
        }
        Event::ManifestPut {
            repo,
            digest,
            media_type,
            subject,
            size,
        } => {
            w.kind(Kind::ManifestPut);
            w.text(repo.as_str());
            w.text(digest.as_str());
            w.text(media_type);
            w.optional(subject.as_ref());
            w.u64(*size);
        }
        Event::TagMoved {
            repo,
            tag,
            from,
            to,
        } => {
            w.kind(Kind::TagMoved);
            w.text(repo.as_str());
            w.text(tag.as_str());
            w.optional(from.as_ref());
            w.text(to.as_str());
        }
        Event::TagDeleted { repo, tag, digest } => {
            w.kind(Kind::TagDeleted);
            w.text(repo.as_str());
            w.text(tag.as_str());
            w.text(digest.as_str());
        }
        Event::ManifestDeleted { repo, digest, tags } => {
            w.kind(Kind::ManifestDeleted);
            w.text(repo.as_str());
            w.text(digest.as_str());
            w.u32(tags.len() as u32);
            for tag in tags {
                w.text(tag.as_str());
            }
        }
        Event::LinkCollected { repo, digest } => {
            w.kind(Kind::LinkCollected);
            w.text(repo.as_str());
            w.text(digest.as_str());
        }
        Event::RepositoryCreated { repo } => {
            w.kind(Kind::RepositoryCreated);
            w.text(repo.as_str());
        }
        Event::RepositoryDeleted { repo } => {
            w.kind(Kind::RepositoryDeleted);
            w.text(repo.as_str());
        }
        Event::BlobCollected { digest, size } => {
            w.kind(Kind::BlobCollected);
            w.text(digest.as_str());
            w.u64(*size);
        }
    }
    w.0
}

/// The entry a record holds, binary or (written before the binary format) JSON.
pub(super) fn decode_entry(bytes: &[u8]) -> Result<OutboxEntry> {
    if bytes.first() != Some(&FORMAT) {
        return decode(bytes);
    }
    let mut r = Reader(&bytes[1..]);
    let at = Timestamp(r.u64()?);
    let kind = r.byte()?;
    let event = match Kind::of(kind).ok_or_else(|| corrupt(&format!("unknown kind {kind}")))? {
        Kind::BlobStored => Event::BlobStored {
            repo: r.repo()?,
            digest: r.digest()?,
            size: r.u64()?,
        },
        Kind::BlobMounted => Event::BlobMounted {
            repo: r.repo()?,
            from: r.repo()?,
            digest: r.digest()?,
        },
        Kind::BlobDeleted => Event::BlobDeleted {
            repo: r.repo()?,
            digest: r.digest()?,
        },
        Kind::ManifestPut => Event::ManifestPut {
            repo: r.repo()?,
            digest: r.digest()?,
            media_type: r.text()?.to_owned(),
            subject: r.optional()?,
            size: r.u64()?,
        },
        Kind::TagMoved => Event::TagMoved {
            repo: r.repo()?,
            tag: r.tag()?,
            from: r.optional()?,
            to: r.digest()?,
        },
        Kind::TagDeleted => Event::TagDeleted {
            repo: r.repo()?,
            tag: r.tag()?,
            digest: r.digest()?,
        },
        Kind::ManifestDeleted => {
            let repo = r.repo()?;
            let digest = r.digest()?;
            let count = r.u32()? as usize;
            // Each tag takes at least its 4-byte length: a corrupt count cannot make
            // this allocate more than the record could hold.
            let mut tags = Vec::with_capacity(count.min(r.0.len() / 4));
            for _ in 0..count {
                tags.push(r.tag()?);
            }
            Event::ManifestDeleted { repo, digest, tags }
        }
        Kind::LinkCollected => Event::LinkCollected {
            repo: r.repo()?,
            digest: r.digest()?,
        },
        Kind::RepositoryCreated => Event::RepositoryCreated { repo: r.repo()? },
        Kind::RepositoryDeleted => Event::RepositoryDeleted { repo: r.repo()? },
        Kind::BlobCollected => Event::BlobCollected {
            digest: r.digest()?,
            size: r.u64()?,
        },
    };
    if !r.0.is_empty() {
        return Err(corrupt("bytes after the last field"));
    }
    Ok(OutboxEntry { at, event })
}

/// Only the time of a record: what trimming needs, without reading the event.
pub(super) fn entry_time(bytes: &[u8]) -> Result<Timestamp> {
    if bytes.first() != Some(&FORMAT) {
        return decode::<OutboxEntry>(bytes).map(|e| e.at);
    }
    Reader(&bytes[1..]).u64().map(Timestamp)
}

fn corrupt(what: &str) -> Error {
    Error::storage(format!("corrupt outbox record: {what}"))
}

struct Writer(Vec<u8>);

impl Writer {
    fn kind(&mut self, kind: Kind) {
        self.0.push(kind as u8);
    }

    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    fn text(&mut self, s: &str) {
        // Names, tags, digests and media types are far below 4 GiB (the manifest size
        // limit bounds a media type).
        self.u32(s.len() as u32);
        self.0.extend_from_slice(s.as_bytes());
    }

    fn optional(&mut self, d: Option<&Digest>) {
        match d {
            Some(d) => {
                self.0.push(1);
                self.text(d.as_str());
            }
            None => self.0.push(0),
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(corrupt("truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn byte(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn text(&mut self) -> Result<&'a str> {
        let len = self.u32()? as usize;
        std::str::from_utf8(self.take(len)?).map_err(|_| corrupt("text is not UTF-8"))
    }

    fn repo(&mut self) -> Result<RepoName> {
        RepoName::parse(self.text()?).map_err(|e| corrupt(&e.to_string()))
    }

    fn tag(&mut self) -> Result<Tag> {
        Tag::parse(self.text()?).map_err(|e| corrupt(&e.to_string()))
    }

    fn digest(&mut self) -> Result<Digest> {
        Digest::parse(self.text()?).map_err(|e| corrupt(&e.to_string()))
    }

    fn optional(&mut self) -> Result<Option<Digest>> {
        match self.byte()? {
            0 => Ok(None),
            1 => self.digest().map(Some),
            b => Err(corrupt(&format!("presence byte {b}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::encode;

    fn every_kind() -> Vec<Event> {
        let repo = RepoName::parse("team/app").unwrap();
        let from = RepoName::parse("team/base").unwrap();
        let (a, b) = (Digest::sha256(b"a"), Digest::sha256(b"b"));
        let tag = Tag::parse("v1").unwrap();
        vec![
            Event::BlobStored {
                repo: repo.clone(),
                digest: a.clone(),
                size: 42,
            },
            Event::BlobMounted {
                repo: repo.clone(),
                from,
                digest: a.clone(),
            },
            Event::BlobDeleted {
                repo: repo.clone(),
                digest: a.clone(),
            },
            Event::ManifestPut {
                repo: repo.clone(),
                digest: a.clone(),
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                subject: Some(b.clone()),
                size: 7,
            },
            Event::ManifestPut {
                repo: repo.clone(),
                digest: b.clone(),
                media_type: String::new(),
                subject: None,
                size: 0,
            },
            Event::TagMoved {
                repo: repo.clone(),
                tag: tag.clone(),
                from: None,
                to: a.clone(),
            },
            Event::TagMoved {
                repo: repo.clone(),
                tag: tag.clone(),
                from: Some(a.clone()),
                to: b.clone(),
            },
            Event::TagDeleted {
                repo: repo.clone(),
                tag: tag.clone(),
                digest: b.clone(),
            },
            Event::ManifestDeleted {
                repo: repo.clone(),
                digest: b.clone(),
                tags: vec![tag, Tag::parse("latest").unwrap()],
            },
            Event::ManifestDeleted {
                repo: repo.clone(),
                digest: a.clone(),
                tags: vec![],
            },
            Event::LinkCollected {
                repo: repo.clone(),
                digest: a.clone(),
            },
            Event::RepositoryCreated { repo: repo.clone() },
            Event::RepositoryDeleted { repo },
            Event::BlobCollected {
                digest: b,
                size: u64::MAX,
            },
        ]
    }

    #[test]
    fn every_kind_reads_back_as_written() {
        for (i, event) in every_kind().into_iter().enumerate() {
            let at = Timestamp(1_700_000_000_000 + i as u64);
            let bytes = encode_entry(at, &event);
            let back = decode_entry(&bytes).unwrap();
            assert_eq!((back.at, &back.event), (at, &event));
            assert_eq!(entry_time(&bytes).unwrap(), at);
        }
    }

    #[test]
    fn json_records_of_earlier_versions_still_read() {
        for event in every_kind() {
            let at = Timestamp(5);
            let json = encode(&OutboxEntry {
                at,
                event: event.clone(),
            })
            .unwrap();
            assert_eq!(json[0], b'{');
            let back = decode_entry(&json).unwrap();
            assert_eq!((back.at, back.event), (at, event));
            assert_eq!(entry_time(&json).unwrap(), at);
        }
    }

    #[test]
    fn damaged_records_are_errors_not_events() {
        let bytes = encode_entry(Timestamp(9), &every_kind()[3]);
        // Every truncation, and one byte too many.
        for len in 1..bytes.len() {
            assert!(decode_entry(&bytes[..len]).is_err(), "cut at {len}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode_entry(&longer).is_err());
        // An unknown kind, a bad presence byte, an invalid name.
        let mut kind = bytes.clone();
        kind[9] = 200;
        assert!(decode_entry(&kind).is_err());
        let mut name = bytes.clone();
        name[14] = b'A';
        let err = decode_entry(&name).unwrap_err().to_string();
        assert!(err.contains("corrupt outbox record"), "{err}");
        // A list count far beyond the record does not allocate it.
        let deleted = encode_entry(Timestamp(9), &every_kind()[9]);
        let mut count = deleted.clone();
        let at = count.len() - 4;
        count[at..].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_entry(&count).is_err());
    }
}
