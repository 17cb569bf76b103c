//! Media keys: validation of what a client sends, and the Redis key names derived from them.
//!
//! Every Redis key starts with `mc:{SCHEMA_MAJOR}:` so that two schema majors sharing shards never
//! read each other's values. The separator `|` is outside every field's character set, so a
//! key name maps back to exactly one `(origin, media_id, variant)`.

use std::fmt;

use crate::proto;

/// Bumped when the stored layout or key scheme changes incompatibly.
pub const SCHEMA_MAJOR: u32 = 1;

const MAX_ORIGIN: usize = 255;
const MAX_MEDIA_ID: usize = 255;
const MAX_VARIANT: usize = 128;

/// A validated media key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    origin: String,
    media_id: String,
    variant: String,
}

/// A field of a request that failed validation; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

fn check(
    field: &str,
    value: &str,
    max: usize,
    allowed: impl Fn(u8) -> bool,
) -> Result<(), FieldError> {
    if value.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if value.len() > max {
        return Err(FieldError::new(
            field,
            format!("must be at most {max} bytes, got {}", value.len()),
        ));
    }
    if let Some(bad) = value.bytes().find(|b| !allowed(*b)) {
        return Err(FieldError::new(
            field,
            format!("character {:?} is not allowed", bad as char),
        ));
    }
    Ok(())
}

fn origin_byte(b: u8) -> bool {
    // Matrix server names: DNS names, IPv4, [IPv6] literals, optional :port.
    b.is_ascii_alphanumeric() || b"-.:[]".contains(&b)
}

fn media_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-_.=".contains(&b)
}

fn variant_byte(b: u8) -> bool {
    media_id_byte(b) || b == b'/'
}

/// Validates an origin on its own (a whole-origin purge).
pub fn check_origin(origin: &str) -> Result<(), FieldError> {
    check("origin", origin, MAX_ORIGIN, origin_byte)
}

/// A `SCAN MATCH` pattern for every object of an origin.
pub fn origin_pattern(origin: &str) -> String {
    format!("mc:{SCHEMA_MAJOR}:o:{}|*", glob_escape(origin))
}

/// The hash of quarantined media on every shard (see `store::quarantine`).
pub const QUARANTINE_KEY: &str = "mc:1:quarantine";

/// The prefix of a media's tombstone key; the rest is its quarantine field.
pub const TOMBSTONE_PREFIX: &str = "mc:1:q:";
/// The prefix of an origin's tombstone key; the rest is the origin.
pub const ORIGIN_TOMBSTONE_PREFIX: &str = "mc:1:qo:";

/// The tombstone key of a quarantined media, as releases before [`QUARANTINE_KEY`] wrote and
/// read it; still written and honoured so that both kinds of replica can run side by side.
pub fn tombstone_key(origin: &str, media_id: &str) -> String {
    format!("{TOMBSTONE_PREFIX}{origin}|{media_id}")
}

/// The tombstone key of a quarantined origin (see [`tombstone_key`]).
pub fn origin_tombstone_key(origin: &str) -> String {
    format!("{ORIGIN_TOMBSTONE_PREFIX}{origin}")
}

/// The prefix of every variant index key; the rest is the media's quarantine field.
pub const VARIANTS_PREFIX: &str = "mc:1:v:";

/// A `SCAN MATCH` pattern for the variant index of every media of an origin.
pub fn origin_variants_pattern(origin: &str) -> String {
    format!("{VARIANTS_PREFIX}{}|*", glob_escape(origin))
}

/// The quarantine field of one media: `origin|media_id`.
pub fn quarantine_field(origin: &str, media_id: &str) -> String {
    format!("{origin}|{media_id}")
}

/// The quarantine field of a whole origin: `origin|*` (`*` is never part of a media id).
pub fn origin_quarantine_field(origin: &str) -> String {
    format!("{origin}|*")
}

impl Key {
    /// Validates the parts of a key. `variant` may be empty (the original).
    pub fn new(origin: &str, media_id: &str, variant: &str) -> Result<Self, FieldError> {
        check("key.origin", origin, MAX_ORIGIN, origin_byte)?;
        check("key.media_id", media_id, MAX_MEDIA_ID, media_id_byte)?;
        if !variant.is_empty() {
            check("key.variant", variant, MAX_VARIANT, variant_byte)?;
            if variant.starts_with('/') || variant.ends_with('/') || variant.contains("//") {
                return Err(FieldError::new(
                    "key.variant",
                    "must not start or end with '/' or contain an empty segment",
                ));
            }
        }
        Ok(Self {
            origin: origin.to_owned(),
            media_id: media_id.to_owned(),
            variant: variant.to_owned(),
        })
    }

    /// Validates a key from the wire; an absent key is an error naming `key`.
    pub fn from_proto(key: Option<&proto::MediaKey>) -> Result<Self, FieldError> {
        let key = key.ok_or_else(|| FieldError::new("key", "is required"))?;
        Self::new(&key.origin, &key.media_id, &key.variant)
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }
    pub fn media_id(&self) -> &str {
        &self.media_id
    }
    pub fn variant(&self) -> &str {
        &self.variant
    }

    /// What the ring hashes: `origin/media_id`, so all variants of one media share a shard.
    pub fn route_key(&self) -> String {
        format!("{}/{}", self.origin, self.media_id)
    }

    /// The Redis key of the published object.
    pub fn redis_key(&self) -> String {
        format!(
            "mc:{SCHEMA_MAJOR}:o:{}|{}|{}",
            self.origin, self.media_id, self.variant
        )
    }

    /// The key a Redis object key names, if it is one of ours.
    pub fn from_redis_key(name: &str) -> Option<Self> {
        let rest = name.strip_prefix(&format!("mc:{SCHEMA_MAJOR}:o:"))?;
        let mut parts = rest.split('|');
        let (origin, media_id, variant) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        Key::new(origin, media_id, variant).ok()
    }

    /// The Redis key of this object's fill lease (on the same shard as the object).
    pub fn lease_key(&self) -> String {
        format!(
            "mc:{SCHEMA_MAJOR}:lease:{}|{}|{}",
            self.origin, self.media_id, self.variant
        )
    }

    /// The Redis key of the set of this media's published variants (their object keys), kept
    /// by the publish script on the media's shard, so that a purge of every variant touches only
    /// those keys instead of scanning the shard.
    pub fn variants_key(&self) -> String {
        format!("{VARIANTS_PREFIX}{}|{}", self.origin, self.media_id)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.origin, self.media_id)?;
        if !self.variant.is_empty() {
            write!(f, "#{}", self.variant)?;
        }
        Ok(())
    }
}

/// Name of a temporary key for a Put in progress; the random part keeps concurrent writers apart.
pub fn temp_key() -> String {
    format!("mc:{SCHEMA_MAJOR}:tmp:{:016x}", fastrand::u64(..))
}

fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\' | '^') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

const MAX_CONTENT_TYPE: usize = 255;
const MAX_FILE_NAME: usize = 1024;

/// Validates the client-supplied parts of a `MediaInfo` on Put.
pub fn check_info(info: &proto::MediaInfo) -> Result<(), FieldError> {
    if info.content_type.len() > MAX_CONTENT_TYPE {
        return Err(FieldError::new(
            "info.content_type",
            format!("must be at most {MAX_CONTENT_TYPE} bytes"),
        ));
    }
    if info
        .content_type
        .bytes()
        .any(|b| !(0x20..0x7f).contains(&b))
    {
        return Err(FieldError::new(
            "info.content_type",
            "must be printable ASCII",
        ));
    }
    if info.file_name.len() > MAX_FILE_NAME {
        return Err(FieldError::new(
            "info.file_name",
            format!("must be at most {MAX_FILE_NAME} bytes"),
        ));
    }
    if info.file_name.chars().any(char::is_control) {
        return Err(FieldError::new(
            "info.file_name",
            "must not contain control characters",
        ));
    }
    if !info.sha256.is_empty() && info.sha256.len() != 32 {
        return Err(FieldError::new(
            "info.sha256",
            format!("must be empty or 32 bytes, got {}", info.sha256.len()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_matrix_shaped_keys() {
        for (o, m, v) in [
            ("example.org", "AbCdEf123", ""),
            ("example.org:8448", "a_b-c=", "thumb/320x240/scale"),
            ("[::1]:8448", "x", "thumb/32x32/crop"),
            ("1.2.3.4", "media.id", "v"),
        ] {
            Key::new(o, m, v).unwrap();
        }
    }

    #[test]
    fn rejects_bad_keys_naming_the_field() {
        let cases = [
            ("", "m", "", "key.origin"),
            ("a b", "m", "", "key.origin"),
            ("o", "", "", "key.media_id"),
            ("o", "m|x", "", "key.media_id"),
            ("o", "m/x", "", "key.media_id"),
            ("o", "m", "/x", "key.variant"),
            ("o", "m", "x//y", "key.variant"),
            ("o", "m", "x|y", "key.variant"),
            ("o", "m", "x*", "key.variant"),
        ];
        for (o, m, v, field) in cases {
            let err = Key::new(o, m, v).unwrap_err();
            assert_eq!(err.field, field, "{o:?} {m:?} {v:?}: {err}");
        }
        let long = "a".repeat(256);
        assert_eq!(Key::new(&long, "m", "").unwrap_err().field, "key.origin");
        assert_eq!(Key::from_proto(None).unwrap_err().field, "key");
    }

    #[test]
    fn redis_keys_carry_the_schema_major_and_route_by_media() {
        let k = Key::new("example.org", "abc", "thumb/1x1/crop").unwrap();
        assert_eq!(k.redis_key(), "mc:1:o:example.org|abc|thumb/1x1/crop");
        assert_eq!(k.route_key(), "example.org/abc");
        assert_eq!(Key::from_redis_key(&k.redis_key()), Some(k.clone()));
        assert_eq!(Key::from_redis_key("mc:1:o:a|b"), None);
        assert_eq!(Key::from_redis_key("mc:1:lease:a|b|"), None);
        assert_eq!(
            Key::new("example.org", "abc", "").unwrap().route_key(),
            k.route_key()
        );
        assert_eq!(k.variants_key(), "mc:1:v:example.org|abc");
        assert_eq!(
            origin_pattern("[::1]"),
            "mc:1:o:\\[::1\\]|*",
            "glob characters are escaped"
        );
        assert!(QUARANTINE_KEY.starts_with(&format!("mc:{SCHEMA_MAJOR}:")));
        assert_eq!(
            k.variants_key(),
            format!(
                "{VARIANTS_PREFIX}{}",
                quarantine_field("example.org", "abc")
            )
        );
    }

    #[test]
    fn info_limits() {
        let mut info = proto::MediaInfo::default();
        check_info(&info).unwrap();
        info.sha256 = vec![0; 31].into();
        assert_eq!(check_info(&info).unwrap_err().field, "info.sha256");
        info.sha256 = Default::default();
        info.content_type = "image/png\n".into();
        assert_eq!(check_info(&info).unwrap_err().field, "info.content_type");
        info.content_type = "image/png".into();
        info.file_name = "a\u{0}b".into();
        assert_eq!(check_info(&info).unwrap_err().field, "info.file_name");
    }
}
