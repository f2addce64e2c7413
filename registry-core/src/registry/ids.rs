//! Where upload session ids come from: random by default, or from a seed
//! ([`RegistryBuilder::with_id_seed`]) so that a test scenario replays byte for byte.

use super::*;
use crate::rng::SplitMix64;

/// The source of the random part of upload session ids.
pub(crate) enum IdSource {
    /// UUID v4 from the operating system's generator (ids are capabilities of a sort:
    /// with authentication off, knowing a session's id is enough to write to it).
    Random,
    /// A seeded stream: the n-th session opened gets the same id in every run.
    Seeded(Mutex<SplitMix64>),
}

impl IdSource {
    pub(crate) fn new(seed: Option<u64>) -> Self {
        match seed {
            None => IdSource::Random,
            Some(seed) => IdSource::Seeded(Mutex::new(SplitMix64::new(seed))),
        }
    }

    /// A new session id, carrying `owner`'s tag when given. Seeded ids have the shape of
    /// random ones (32 hex digits, then `_<16 hex>` for an owner), so nothing
    /// downstream (owner checks, the session limits, stores' file and object names)
    /// can tell them apart.
    pub(crate) fn upload_id(&self, owner: Option<&UploadOwner>) -> UploadId {
        match self {
            IdSource::Random => match owner {
                None => UploadId::random(),
                Some(owner) => UploadId::random_for(owner),
            },
            IdSource::Seeded(rng) => {
                let (hi, lo) = {
                    let mut rng = rng.lock().unwrap_or_else(|p| p.into_inner());
                    (rng.next_u64(), rng.next_u64())
                };
                let id = match owner {
                    None => format!("{hi:016x}{lo:016x}"),
                    Some(owner) => format!("{hi:016x}{lo:016x}_{}", owner.tag()),
                };
                UploadId::parse(&id).expect("32 hex digits and an owner tag make a valid id")
            }
        }
    }
}

impl Registry {
    /// The id of a session about to be opened (see [`IdSource`]).
    pub(super) fn new_upload_id(&self, owner: Option<&UploadOwner>) -> UploadId {
        self.inner.ids.upload_id(owner)
    }
}
