//! Typed events for embedders: every change the registry makes.
//!
//! Two ways to see them:
//! - the outbox ([`Registry::events_after`](crate::Registry::events_after),
//!   [`Registry::events_from`](crate::Registry::events_from)): each change writes its
//!   events in the same atomic metadata change that makes it, numbered, so a change is
//!   committed if and only if its events are; every process sharing the storage sees
//!   them, and a consumer resumes from its cursor after a restart (`docs/design.md`,
//!   "Notifications: the outbox");
//! - [`Registry::subscribe`](crate::Registry::subscribe): the same events as this
//!   process makes them, in memory, with no delay and no durability (a slow receiver
//!   loses events).

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::names::{RepoName, Tag};
use crate::time::Timestamp;

/// A change made by the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    /// A blob upload finished and was linked into a repository.
    BlobStored {
        /// Where.
        repo: RepoName,
        /// What.
        digest: Digest,
        /// Its size.
        size: u64,
    },
    /// A blob was mounted into a repository from another.
    BlobMounted {
        /// The target repository.
        repo: RepoName,
        /// The source repository.
        from: RepoName,
        /// The blob.
        digest: Digest,
    },
    /// A repository's link to a blob was deleted.
    BlobDeleted {
        /// Where.
        repo: RepoName,
        /// What.
        digest: Digest,
    },
    /// A manifest was stored in a repository. Pushing it again changes nothing but its
    /// tags, and reports only a [`TagMoved`](Event::TagMoved) for each tag it moved.
    ManifestPut {
        /// Where.
        repo: RepoName,
        /// Its digest.
        digest: Digest,
        /// Its media type.
        media_type: String,
        /// Its subject, if it is a referrer.
        subject: Option<Digest>,
        /// Its size in bytes.
        #[serde(default)]
        size: u64,
    },
    /// A tag now points at a different manifest.
    TagMoved {
        /// Where.
        repo: RepoName,
        /// The tag.
        tag: Tag,
        /// What it pointed at before, if anything.
        from: Option<Digest>,
        /// What it points at now.
        to: Digest,
    },
    /// A tag was deleted.
    TagDeleted {
        /// Where.
        repo: RepoName,
        /// The tag.
        tag: Tag,
        /// What it pointed at.
        digest: Digest,
    },
    /// A manifest was deleted from a repository (its tags with it).
    ManifestDeleted {
        /// Where.
        repo: RepoName,
        /// What.
        digest: Digest,
        /// Tags deleted with it.
        tags: Vec<Tag>,
    },
    /// The collector removed a repository's unreferenced link to a blob.
    LinkCollected {
        /// Where.
        repo: RepoName,
        /// What.
        digest: Digest,
    },
    /// A repository got its first manifest or blob link.
    RepositoryCreated {
        /// The repository.
        repo: RepoName,
    },
    /// A repository lost its last manifest and blob link (by
    /// [`Registry::delete_repository`](crate::Registry::delete_repository), by deletes
    /// or by the collector). Each manifest (with its tags) and blob link it held was
    /// reported by its own event first.
    RepositoryDeleted {
        /// The repository.
        repo: RepoName,
    },
    /// The collector deleted a blob's bytes.
    BlobCollected {
        /// What.
        digest: Digest,
        /// Bytes freed.
        size: u64,
    },
}

impl Event {
    /// The repository the change is in; `None` for [`Event::BlobCollected`], which is
    /// registry-wide.
    pub fn repository(&self) -> Option<&RepoName> {
        match self {
            Event::BlobStored { repo, .. }
            | Event::BlobMounted { repo, .. }
            | Event::BlobDeleted { repo, .. }
            | Event::ManifestPut { repo, .. }
            | Event::TagMoved { repo, .. }
            | Event::TagDeleted { repo, .. }
            | Event::ManifestDeleted { repo, .. }
            | Event::LinkCollected { repo, .. }
            | Event::RepositoryCreated { repo }
            | Event::RepositoryDeleted { repo } => Some(repo),
            Event::BlobCollected { .. } => None,
        }
    }
}

/// An event as the outbox keeps it: its place in the storage's history and when it
/// was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// Its sequence number: unique in the storage, increasing in the order the changes
    /// were committed (`docs/design.md` says how exactly on each store).
    pub seq: u64,
    /// When the change was made (the writing process's clock).
    pub at: Timestamp,
    /// The change.
    pub event: Event,
}

impl StoredEvent {
    /// An id that is the same in every process that reads this event, for receivers to
    /// drop duplicates (delivery is at least once): the sequence number and a hash of
    /// the event's stored record (its time, kind and fields, each length-prefixed: see
    /// `kv/event_codec.rs`), so that two storages' events with one number still differ.
    ///
    /// The hash is a 64-bit multiply-rotate hash (`IdHash` below), not a cryptographic
    /// one: it only has to tell apart events of two storages that share a number, and
    /// no one gains by making two of them collide, while a webhook computes an id for
    /// every event it delivers (a SHA-256 here was a quarter of what delivering a
    /// tagged manifest push cost). Ids changed with each of these choices (SHA-256 of
    /// the JSON, SHA-256 of the fields, this hash of the record): a batch sent again
    /// across such an upgrade carries new ids.
    pub fn id(&self) -> String {
        let record = crate::kv::event_record(self.at, &self.event);
        let mut h = IdHash::new();
        h.write(&(record.len() as u64).to_le_bytes());
        h.write(&record);
        format!("{}-{:016x}", self.seq, h.finish())
    }

    /// The repository the change is in, if any.
    pub fn repository(&self) -> Option<&RepoName> {
        self.event.repository()
    }
}

/// The hash of [`StoredEvent::id`]: 8-byte words (the last one zero-padded) each mixed
/// in by xor, multiplication by an odd constant and rotation, then a final avalanche
/// (splitmix64's). Its output is part of ids that receivers keep, so it is written out
/// here, never taken from a library whose output may change between versions. The
/// record's length is hashed first, so the padding of the last word cannot make two
/// inputs equal.
struct IdHash(u64);

impl IdHash {
    const MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;

    fn new() -> Self {
        IdHash(0x6a09_e667_f3bc_c908)
    }

    fn mix(&mut self, word: u64) {
        self.0 = (self.0 ^ word)
            .wrapping_mul(Self::MULTIPLIER)
            .rotate_left(29);
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            self.mix(u64::from_le_bytes(w.try_into().expect("8 bytes")));
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut last = [0u8; 8];
            last[..rest.len()].copy_from_slice(rest);
            self.mix(u64::from_le_bytes(last));
        }
    }

    fn finish(&self) -> u64 {
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// The body of an outbox entry (the sequence number is its key).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct OutboxEntry {
    pub at: Timestamp,
    pub event: Event,
}

/// A page of the outbox: see [`Registry::events_after`](crate::Registry::events_after).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventPage {
    /// Events after the cursor, in sequence order.
    pub events: Vec<StoredEvent>,
    /// The cursor to read from next: the last event's number, or further when numbers
    /// were skipped (never used, or trimmed).
    pub next_after: u64,
    /// Events up to this number had been trimmed before they were read: a reader whose
    /// cursor was behind them missed them. Zero when nothing was missed.
    pub missed_through: u64,
}

/// Where a store's raw outbox read stopped: the entries, and whether a gap (a number
/// not visible yet) may still fill. See [`MetadataStore::events_after`].
///
/// [`MetadataStore::events_after`]: crate::store::MetadataStore::events_after
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboxRead {
    /// Entries after the cursor, in sequence order, possibly with gaps.
    pub events: Vec<StoredEvent>,
    /// Every number at or below this was trimmed.
    pub trimmed_through: u64,
    /// On engines whose numbers can become visible out of order (PostgreSQL), a token
    /// of the snapshot that read them: once [`MetadataStore::outbox_settled`] says so
    /// for it, every number missing below the last entry read is gone for good.
    /// `None` on engines whose numbers are visible in order (memory, redb, the bucket
    /// log): there a missing number is never coming.
    ///
    /// [`MetadataStore::outbox_settled`]: crate::store::MetadataStore::outbox_settled
    pub horizon: Option<u64>,
}

/// A durable consumer of the outbox: its cursor and who delivers for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerRecord {
    /// Every event up to here was acknowledged.
    pub cursor: u64,
    /// The process that holds the lease (empty: nobody).
    pub owner: String,
    /// The lease lasts until then.
    pub lease_until: Timestamp,
    /// Last acknowledgement or claim.
    pub updated_at: Timestamp,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag_moved(tag: &str, from: Option<&Digest>, to: &Digest) -> Event {
        Event::TagMoved {
            repo: RepoName::parse("team/app").unwrap(),
            tag: Tag::parse(tag).unwrap(),
            from: from.cloned(),
            to: to.clone(),
        }
    }

    fn stored(seq: u64, at: u64, event: Event) -> StoredEvent {
        StoredEvent {
            seq,
            at: Timestamp(at),
            event,
        }
    }

    /// The id of the first event of `ids_are_stable_and_differ_with_any_field`.
    const PINNED_ID: &str = "7-7b22ee0e9cb6437d";

    #[test]
    fn ids_are_stable_and_differ_with_any_field() {
        let (a, b) = (Digest::sha256(b"a"), Digest::sha256(b"b"));
        let base = stored(7, 1_000, tag_moved("v1", None, &a));
        assert_eq!(base.id(), base.clone().id(), "the same event, the same id");
        // Pinned: receivers keep ids, so the hash must not change by accident (a
        // change of library or of a constant would show here).
        assert_eq!(base.id(), PINNED_ID);
        assert!(base.id().starts_with("7-"));
        assert_eq!(base.id().len(), "7-".len() + 16);
        let others = [
            stored(8, 1_000, tag_moved("v1", None, &a)),
            stored(7, 1_001, tag_moved("v1", None, &a)),
            stored(7, 1_000, tag_moved("v2", None, &a)),
            stored(7, 1_000, tag_moved("v1", Some(&b), &a)),
            stored(7, 1_000, tag_moved("v1", None, &b)),
            stored(
                7,
                1_000,
                Event::TagDeleted {
                    repo: RepoName::parse("team/app").unwrap(),
                    tag: Tag::parse("v1").unwrap(),
                    digest: a.clone(),
                },
            ),
        ];
        for other in &others {
            assert_ne!(base.id(), other.id(), "{other:?}");
        }
    }

    #[test]
    fn id_hashes_of_one_number_do_not_collide_in_ten_thousand_events() {
        let a = Digest::sha256(b"a");
        let hashes: std::collections::HashSet<String> = (0..10_000)
            .map(|i| {
                let id = stored(1, 1_000, tag_moved(&format!("t{i}"), None, &a)).id();
                id["1-".len()..].to_owned()
            })
            .collect();
        assert_eq!(hashes.len(), 10_000);
    }
}
