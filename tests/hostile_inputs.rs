//! Property tests over what clients, shards and operators hand the tier: the stored value header
//! (a shard may return anything), key validation (clients may send anything), and the config
//! parser (an operator may push anything). cargo-fuzz needs a nightly toolchain, which cannot be
//! installed on the build machines, so these use proptest with many cases instead.
//!
//! `PROPTEST_CASES` raises the case count (default here: 4096 per property).

use mediacache::config::Config;
use mediacache::key::{check_info, Key};
use mediacache::object::{decode_header, encode_header, MAX_HEADER_LEN, PREFIX_LEN};
use mediacache::proto::MediaInfo;
use proptest::prelude::*;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4096);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn media_info() -> impl Strategy<Value = MediaInfo> {
    (
        prop_oneof![any::<u64>(), (u64::MAX - 10_000)..=u64::MAX],
        "[ -~]{0,64}",
        "\\PC{0,64}",
        prop::collection::vec(any::<u8>(), 0..=32),
        any::<i64>(),
    )
        .prop_map(
            |(size, content_type, file_name, sha256, stored_at_unix_ms)| MediaInfo {
                size,
                content_type,
                file_name,
                sha256: sha256.into(),
                stored_at_unix_ms,
            },
        )
}

proptest! {
    #![proptest_config(config())]

    /// Any bytes a shard returns decode to a header or an error, never a panic, and a header
    /// never claims more than it holds.
    #[test]
    fn header_decoder_takes_any_bytes(buf in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(h) = decode_header(&buf) {
            prop_assert!(h.len <= buf.len());
            prop_assert!(h.len <= MAX_HEADER_LEN);
            let _ = h.value_len();
        }
    }

    /// The same, for values that start like ours: magic and version right, the rest random.
    #[test]
    fn header_decoder_takes_any_bytes_after_our_magic(
        nonce in any::<u64>(),
        info_len in any::<u16>(),
        rest in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut buf = b"mcob\x01".to_vec();
        buf.extend_from_slice(&nonce.to_be_bytes());
        buf.extend_from_slice(&info_len.to_be_bytes());
        buf.extend_from_slice(&rest);
        if let Ok(h) = decode_header(&buf) {
            prop_assert_eq!(h.len, 15 + info_len as usize);
            let _ = h.value_len();
        }
    }

    /// Every header we write reads back exactly, whatever body follows it.
    #[test]
    fn headers_round_trip(
        info in media_info(),
        nonce in any::<u64>(),
        body in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let header = encode_header(&info, nonce).unwrap();
        let mut value = header.to_vec();
        value.extend_from_slice(&body);
        let decoded = decode_header(&value).unwrap();
        prop_assert_eq!(decoded.len, header.len());
        prop_assert_eq!(&decoded.prefix[..], &header[..PREFIX_LEN]);
        prop_assert_eq!(&decoded.info, &info);
        // The size comes from the shard: near u64::MAX it must not overflow.
        prop_assert!(decoded.value_len() >= decoded.len as u64);
    }

    /// A header with one byte flipped is refused, or decodes to something whose prefix or info
    /// differs, so a reader never mistakes it for the original publish.
    #[test]
    fn a_flipped_header_byte_never_passes_as_the_original(
        info in media_info(),
        nonce in any::<u64>(),
        at in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let header = encode_header(&info, nonce).unwrap();
        let mut bad = header.to_vec();
        let i = at.index(bad.len());
        bad[i] ^= flip;
        if let Ok(h) = decode_header(&bad) {
            prop_assert!(
                h.prefix[..] != header[..PREFIX_LEN] || h.info != info || h.len != header.len(),
                "flipping byte {} went unnoticed", i
            );
        }
    }

    /// Key validation takes any strings; accepted keys never contain the separators of the
    /// Redis key names, so distinct keys always get distinct Redis keys.
    #[test]
    fn key_validation_takes_any_strings(
        a in ("\\PC{0,40}", "\\PC{0,40}", "\\PC{0,40}"),
        b in ("[a-z0-9.:-]{1,20}", "[A-Za-z0-9_=.-]{1,20}", "([a-z0-9]{1,5}(/[a-z0-9]{1,5}){0,3})?"),
    ) {
        let _ = Key::new(&a.0, &a.1, &a.2);
        if let Ok(key) = Key::new(&b.0, &b.1, &b.2) {
            let redis = key.redis_key();
            prop_assert_eq!(redis.matches('|').count(), 2, "{}", redis);
            prop_assert!(redis.is_ascii());
        }
    }

    #[test]
    fn distinct_keys_get_distinct_redis_keys(
        a in ("[a-z0-9.:-]{1,8}", "[A-Za-z0-9_=.-]{1,8}", "([a-z0-9]{1,3}(/[a-z0-9]{1,3}){0,2})?"),
        b in ("[a-z0-9.:-]{1,8}", "[A-Za-z0-9_=.-]{1,8}", "([a-z0-9]{1,3}(/[a-z0-9]{1,3}){0,2})?"),
    ) {
        if let (Ok(ka), Ok(kb)) = (Key::new(&a.0, &a.1, &a.2), Key::new(&b.0, &b.1, &b.2)) {
            prop_assert_eq!(a == b, ka.redis_key() == kb.redis_key());
        }
    }

    /// Client-supplied media info is checked without panicking.
    #[test]
    fn media_info_checks_take_anything(info in media_info()) {
        let _ = check_info(&info);
    }

    /// Any text an operator pushes parses to a valid config or to errors, never a panic.
    #[test]
    fn config_parser_takes_any_text(text in "\\PC{0,200}") {
        let _ = Config::from_yaml(&text);
    }

    /// YAML shaped like a config, with values of the wrong kind and size here and there: a
    /// valid result survives a round trip through YAML unchanged.
    #[test]
    fn config_parser_takes_config_shaped_yaml(
        chunk in prop_oneof![Just("262144".to_owned()), "-?[0-9]{1,22}", "\"[a-z]{0,5}\""],
        weight in prop_oneof![Just("1".to_owned()), "-?[0-9]{1,12}", Just("null".to_owned())],
        name in prop_oneof!["[a-z0-9._-]{1,70}", Just("\"\"".to_owned()), "\\PC{1,10}"],
        url in prop_oneof![
            "redis://[a-z0-9.]{1,12}:[0-9]{1,6}(/[0-9]{1,4})?",
            "rediss?://\\PC{0,20}",
            "\\PC{0,20}"
        ],
        timeout in prop_oneof!["[0-9]{1,6}(ms|s|m|h)", "\\PC{0,8}"],
        failover in prop_oneof![Just("none".to_owned()), Just("next".to_owned()), "[a-z]{0,6}"],
    ) {
        let text = format!(
            "chunk_bytes: {chunk}\nfailover: {failover}\nredis:\n  command_timeout: {timeout}\nshards:\n  - name: {name}\n    url: {url:?}\n    weight: {weight}\n"
        );
        if let Ok(loaded) = Config::from_yaml(&text) {
            let again = yaml_serde::to_string(&loaded.config).unwrap();
            let reparsed = Config::from_yaml(&again).unwrap();
            prop_assert_eq!(reparsed.config, loaded.config);
        }
    }
}
