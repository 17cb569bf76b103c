//! The Redis tier's atomic steps, each one Lua script run on one shard, and the event each one
//! announces: the keys they touch and the payloads they publish are built here and nowhere else.

use bytes::Bytes;
use fred::prelude::Value;

use crate::events::{channel, Event};
use crate::key::{
    origin_quarantine_field, origin_tombstone_key, quarantine_field, tombstone_key, Key,
    ORIGIN_TOMBSTONE_PREFIX, QUARANTINE_KEY, TOMBSTONE_PREFIX, VARIANTS_PREFIX,
};
use crate::shard::pinned::Pinned;
use crate::shard::{Shard, ShardError};

/// Lua that returns 2 when the media or its origin is quarantined, by a tombstone (KEYS[5],
/// KEYS[6]: how releases before the quarantine hash quarantine) or by the quarantine hash
/// (KEYS[3], fields ARGV[5] and ARGV[6], ending at unix ms after `now`); `$refuse` runs first.
macro_rules! lua_refuse_quarantined {
    ($refuse:literal) => {
        concat!(
            "if redis.call('EXISTS', KEYS[5], KEYS[6]) > 0 then\n",
            $refuse,
            "  return 2\nend\nlocal q = redis.call('HMGET', KEYS[3], ARGV[5], ARGV[6])\n",
            "for i = 1, 2 do\n  if q[i] and (tonumber(q[i]) or 0) > now then\n",
            $refuse,
            "    return 2\n  end\nend\n"
        )
    };
}

/// Lua that sets `now` to the shard's clock in unix ms: quarantines end by it.
macro_rules! lua_now {
    () => {
        "local t = redis.call('TIME')\nlocal now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
    };
}

/// Publishes a temporary key under its final name, only when it holds exactly the expected
/// number of bytes and the media is not quarantined: writes the final header over the draft one,
/// renames, clears the TTL, adds the key to its media's variant index and announces the fill,
/// all in one atomic step.
/// KEYS: temporary, final, quarantine hash, variant index, media tombstone, origin tombstone
/// (the tombstones are how releases before the quarantine hash quarantine). ARGV: expected
/// length, header, channel, event, media field, origin field, and the write counter the value
/// must hold (see [`WRITTEN_SCRIPT`]; an uploaded value holds the whole body's; '' for a value
/// set whole with its publish).
/// Returns 1 published, 0 lost (temporary key missing, short, or not all written), 2
/// quarantined.
const PUBLISH_SCRIPT: &str = concat!(
    lua_now!(),
    lua_refuse_quarantined!("  redis.call('DEL', KEYS[1])\n"),
    r#"
if redis.call('STRLEN', KEYS[1]) ~= tonumber(ARGV[1]) then
  redis.call('DEL', KEYS[1])
  return 0
end
if ARGV[7] ~= '' and redis.call('GETRANGE', KEYS[1], 0, string.len(ARGV[7]) - 1) ~= ARGV[7] then
  redis.call('DEL', KEYS[1])
  return 0
end
redis.call('SADD', KEYS[4], KEYS[2])
redis.call('SETRANGE', KEYS[1], 0, ARGV[2])
redis.call('RENAME', KEYS[1], KEYS[2])
redis.call('PERSIST', KEYS[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"#
);

/// Stores a small whole value (header and body) under its final name in one script, with the
/// same checks and announcement as [`PUBLISH_SCRIPT`]: no temporary key, no rename, one command.
/// The shard copies the value into Lua and out again, which costs less than a second command
/// up to [`STORE_IN_SCRIPT_BYTES`].
/// KEYS and ARGV as [`PUBLISH_SCRIPT`]'s (KEYS[1] unused), with the whole value as ARGV[2].
/// Returns 1 stored, 2 quarantined.
const STORE_SCRIPT: &str = concat!(
    lua_now!(),
    lua_refuse_quarantined!(""),
    r#"
redis.call('SADD', KEYS[4], KEYS[2])
redis.call('SET', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"#
);

/// Values (header and body) up to this length are stored by [`STORE_SCRIPT`]; longer ones by a
/// `SET` of a temporary key and [`PUBLISH_SCRIPT`], which copy them fewer times. At 8 KiB the
/// script cost the shard what the second command did and saved the service 18 % of its CPU per
/// Put; at 64 KiB the copies through Lua doubled the shard's CPU per Put.
pub const STORE_IN_SCRIPT_BYTES: usize = 16 * 1024;

/// Explicit growth by doubling stops at this length; past it a piece's own `SETRANGE` extends
/// the value (Redis adds a megabyte of room at a time). Doubling copies a value fewest times,
/// but each doubling is one command that allocates, zeroes and copies the whole value: 64
/// parallel Puts of 64 MiB doubling from 32 to 64 MiB at once held one shard for seconds, past
/// the command timeout. Capped here, a doubling touches at most 16 MiB of fresh memory; past
/// the cap a growing value may still be moved (and copied) by the shard's allocator, a size
/// class at a time, which that burst survived.
pub const GROW_DOUBLING_BYTES: u64 = 16 * 1024 * 1024;

/// Makes room in a temporary key for the next piece, only while the key holds the write counter
/// this writer left in it. A key too short for the piece is grown to twice its length, up to
/// [`GROW_DOUBLING_BYTES`] (zeros after what was written, never past the whole value's length):
/// the shard copies a value as it grows a few times, not at every write as appends made it, and
/// never holds more than twice what was sent.
///
/// A key that is gone, or not as this writer left it (brought back from an older snapshot), is
/// replaced by a hash with the TTL: the piece's `SETRANGE` that follows then fails on its type
/// instead of recreating the value, and [`WRITTEN_SCRIPT`] deletes the hash.
/// KEYS: temporary. ARGV: counter expected, length needed, whole length, TTL in ms, doubling
/// cap. Returns 1 when the piece may be written, 0 when the write is lost.
const GROW_SCRIPT: &str = r#"
if redis.call('GETRANGE', KEYS[1], 0, string.len(ARGV[1]) - 1) ~= ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'lost', '1')
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return 0
end
local len = redis.call('STRLEN', KEYS[1])
local need = tonumber(ARGV[2])
local cap = tonumber(ARGV[5])
if len < need and len < cap then
  local grown = math.min(tonumber(ARGV[3]), math.max(need, math.min(2 * len, cap)))
  redis.call('SETRANGE', KEYS[1], grown - 1, '\0')
end
return 1
"#;

/// Ends a piece's write: moves the write counter on and renews the TTL, only while the key
/// still holds the counter this writer left before the piece; otherwise deletes it (the hash
/// [`GROW_SCRIPT`] left).
///
/// The piece's bytes go by a plain `SETRANGE` between the two scripts, in one transaction:
/// the shard copies them once, where a script taking them as an argument copied them three
/// times (into Lua, back out, and into the value).
/// KEYS: temporary. ARGV: counter expected, counter after, TTL in ms. Returns 1 written, 0 when
/// the write is lost.
const WRITTEN_SCRIPT: &str = r#"
if redis.call('TYPE', KEYS[1]).ok ~= 'string'
  or redis.call('GETRANGE', KEYS[1], 0, string.len(ARGV[1]) - 1) ~= ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 0
end
redis.call('SETRANGE', KEYS[1], 0, ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"#;

/// The write counter of a value being written in pieces (the body bytes written so far) or
/// uploaded (its whole body), over the first bytes of the draft header (the publish writes the
/// real header over it).
pub fn write_counter(written: u64) -> String {
    format!("{written:012}")
}

/// Purges one object, or with ARGV[1] = '1' every variant in its media's index, optionally
/// quarantining first, then announces the purge; one round trip, one atomic step.
/// The quarantine is also written as a tombstone key with a TTL, the form releases before the
/// quarantine hash read, so that both honour it while they run side by side.
/// KEYS: object, variant index, quarantine hash, tombstone. ARGV: all variants ('1'/'0'),
/// quarantine field ('' for none), its end (unix ms), channel, purge event, quarantine event.
/// Returns the objects deleted.
const PURGE_SCRIPT: &str = concat!(
    lua_now!(),
    r#"
if ARGV[2] ~= '' then
  if redis.call('HEXISTS', KEYS[3], '~id') == 0 then
    redis.call('HSET', KEYS[3], '~id', t[1] .. '.' .. t[2], '~gen', 0)
  end
  local current = tonumber(redis.call('HGET', KEYS[3], ARGV[2]) or '0') or 0
  if tonumber(ARGV[3]) > current then
    redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
    redis.call('HINCRBY', KEYS[3], '~gen', 1)
  end
  redis.call('SET', KEYS[4], '1', 'PX', math.max(1, tonumber(ARGV[3]) - now))
  redis.call('PUBLISH', ARGV[4], ARGV[6])
end
local n = 0
if ARGV[1] == '1' then
  for _, k in ipairs(redis.call('SMEMBERS', KEYS[2])) do
    n = n + redis.call('DEL', k)
  end
  n = n + redis.call('DEL', KEYS[1])
  redis.call('DEL', KEYS[2])
else
  n = redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[2], KEYS[1])
end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return n
"#
);

/// Merges a replica's quarantines into the shard's hash, and tells the replica what it holds
/// when that changed since the replica last looked.
///
/// The hash carries its identity in two fields: `~id` (set when the hash is created, so a hash
/// that was evicted or lost in a restart comes back as another one) and `~gen` (bumped by every
/// change); `id:gen` is the token a replica remembers. A pushed field that is new or longer is
/// written, with the tombstone key that releases before the hash read; if the shard lacked it,
/// the media's objects on this shard are deleted with its variant index (a Put may have stored
/// them while the field was missing). Replicas learn written-back fields by pulling, not by one event per field: a
/// hash of thousands lost at once would overflow every replica's event buffer.
/// KEYS: quarantine hash. ARGV: variant index prefix, media tombstone prefix, origin tombstone
/// prefix, the caller's token ('' none), then (field, end) for each pushed quarantine.
/// Returns {n, n fields the shard lacked, token ('' while there is no hash), then (field, end)
/// for every live quarantine only when the token differs from the caller's}. Without anything
/// to push, a missing hash is not created.
const QUARANTINE_SYNC_SCRIPT: &str = concat!(
    lua_now!(),
    r#"
local exists = redis.call('HEXISTS', KEYS[1], '~id') == 1
if not exists and #ARGV > 4 then
  redis.call('HSET', KEYS[1], '~id', t[1] .. '.' .. t[2], '~gen', 0)
  exists = true
end
local lacked = {}
for i = 5, #ARGV, 2 do
  local field = ARGV[i]
  local want = tonumber(ARGV[i + 1])
  local current = tonumber(redis.call('HGET', KEYS[1], field) or '0') or 0
  if want > now and want > current then
    redis.call('HSET', KEYS[1], field, ARGV[i + 1])
    redis.call('HINCRBY', KEYS[1], '~gen', 1)
    local whole_origin = string.sub(field, -2) == '|*'
    if whole_origin then
      redis.call('SET', ARGV[3] .. string.sub(field, 1, -3), '1', 'PX', want - now)
    else
      redis.call('SET', ARGV[2] .. field, '1', 'PX', want - now)
    end
    if current <= now then
      table.insert(lacked, field)
      if not whole_origin then
        local index = ARGV[1] .. field
        for _, k in ipairs(redis.call('SMEMBERS', index)) do
          redis.call('DEL', k)
        end
        redis.call('DEL', index)
      end
    end
  end
end
local token = ''
if exists then
  token = (redis.call('HGET', KEYS[1], '~id') or '') .. ':' ..
    (redis.call('HGET', KEYS[1], '~gen') or '0')
end
local out = {#lacked}
for _, f in ipairs(lacked) do
  table.insert(out, f)
end
table.insert(out, token)
if token ~= ARGV[4] and exists then
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    if string.sub(all[i], 1, 1) ~= '~' then
      if (tonumber(all[i + 1]) or 0) <= now then
        redis.call('HDEL', KEYS[1], all[i])
      else
        table.insert(out, all[i])
        table.insert(out, all[i + 1])
      end
    end
  end
end
return out
"#
);

/// Deletes a lease only if it is still the caller's, and announces that it is free.
/// KEYS: lease. ARGV: token, channel, event.
const RELEASE_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
"#;

/// What one quarantine merge with a shard found.
#[derive(Debug, Clone)]
pub struct QuarantineSync {
    /// Fields the shard lacked and now holds again.
    pub lacked: Vec<String>,
    /// Every live quarantine of the shard, when its hash changed since the caller's token.
    pub held: Option<Vec<(String, i64)>>,
    /// The hash's token now.
    pub token: String,
}

/// How a publish ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Published {
    Stored,
    /// The temporary key was gone or short (expired, or the shard restarted).
    Lost,
    /// The media is quarantined on the shard.
    Quarantined,
}

/// Writes `data` at body offset `written` of a value of `total` bytes started by
/// [`RedisWriter`](super::writer::RedisWriter)'s first write and renews its TTL: one
/// `MULTI`/`EXEC` of [`GROW_SCRIPT`], `SETRANGE` and [`WRITTEN_SCRIPT`] (see
/// [`Pinned::write_between`]). False when the key was
/// gone or not as this writer left it: the write is lost.
pub async fn write_piece(
    conn: &Pinned,
    (temp, ttl): (&str, std::time::Duration),
    (header_len, total): (u64, u64),
    written: u64,
    data: Bytes,
) -> Result<bool, ShardError> {
    let offset = header_len + written;
    let expected = write_counter(written);
    let ttl = ttl.as_millis() as i64;
    let grow = vec![
        Value::from(expected.clone()),
        Value::from((offset + data.len() as u64) as i64),
        Value::from(total as i64),
        Value::from(ttl),
        Value::from(GROW_DOUBLING_BYTES as i64),
    ];
    let done = vec![
        Value::from(expected),
        Value::from(write_counter(written + data.len() as u64)),
        Value::from(ttl),
    ];
    let replies = conn
        .write_between(
            (GROW_SCRIPT, grow),
            (temp, offset, data),
            (WRITTEN_SCRIPT, done),
        )
        .await;
    piece_written(replies)
}

/// Reads the replies of [`write_piece`]'s transaction. Written only when both scripts say so;
/// the `SETRANGE` refused on the hash [`GROW_SCRIPT`] left in a lost key's place is a lost
/// write; any other error fails the write, even where [`WRITTEN_SCRIPT`] moved the counter on
/// (a `SETRANGE` refused for the value's size, say): the value is never published over it.
fn piece_written(replies: Result<Vec<Value>, ShardError>) -> Result<bool, ShardError> {
    match replies {
        Ok(replies) => {
            let one = |i: usize| replies.get(i).and_then(Value::as_i64) == Some(1);
            Ok(one(0) && one(2))
        }
        Err(e) if e.is_wrong_type() => Ok(false),
        Err(e) => Err(e),
    }
}

/// The keys and arguments of [`PUBLISH_SCRIPT`] (or [`STORE_SCRIPT`], with the whole value as
/// `header`) for `key`.
fn publish_call(
    temp: &str,
    key: &Key,
    header: Bytes,
    (expected_len, counter): (u64, &str),
    version: u64,
) -> (Vec<String>, Vec<Value>) {
    let redis_key = key.redis_key();
    let filled = Event::Filled {
        key: redis_key.clone(),
        version: Some(version),
    };
    let args: Vec<Value> = vec![
        Value::from(expected_len as i64),
        Value::from(header),
        Value::from(channel()),
        Value::from(filled.encode()),
        Value::from(quarantine_field(key.origin(), key.media_id())),
        Value::from(origin_quarantine_field(key.origin())),
        Value::from(counter),
    ];
    let keys = vec![
        temp.to_owned(),
        redis_key,
        QUARANTINE_KEY.to_owned(),
        key.variants_key(),
        tombstone_key(key.origin(), key.media_id()),
        origin_tombstone_key(key.origin()),
    ];
    (keys, args)
}

fn published(done: i64) -> Published {
    match done {
        1 => Published::Stored,
        2 => Published::Quarantined,
        _ => Published::Lost,
    }
}

/// Writes `header` at the start of a complete temporary key, written in pieces or uploaded
/// (holding the write counter of `written` body bytes), and renames it to `key`, announcing the
/// fill with the publish's `version` (see [`PUBLISH_SCRIPT`]).
pub async fn publish(
    conn: &Pinned,
    temp: &str,
    key: &Key,
    header: Bytes,
    written: u64,
    version: u64,
) -> Result<Published, ShardError> {
    let expected_len = header.len() as u64 + written;
    let counter = write_counter(written);
    let (keys, args) = publish_call(temp, key, header, (expected_len, &counter), version);
    Ok(published(conn.eval(PUBLISH_SCRIPT, keys, args).await?))
}

/// A whole object in one round trip: `value` (header and body) up to
/// [`STORE_IN_SCRIPT_BYTES`] is stored by [`STORE_SCRIPT`] alone; a longer one is written to the
/// temporary key with its TTL, and published by [`PUBLISH_SCRIPT`] right after, on the same
/// connection. The shard never holds a partial value under the final name, and the publish is
/// the same atomic step as for a body written in pieces.
pub async fn store_whole(
    conn: &Pinned,
    (temp, ttl): (&str, std::time::Duration),
    key: &Key,
    value: Bytes,
    header_len: usize,
    version: u64,
) -> Result<Published, ShardError> {
    let len = value.len() as u64;
    if value.len() <= STORE_IN_SCRIPT_BYTES {
        let (keys, args) = publish_call(temp, key, value, (len, ""), version);
        return Ok(published(conn.eval(STORE_SCRIPT, keys, args).await?));
    }
    let header = value.slice(..header_len);
    let (keys, args) = publish_call(temp, key, header, (len, ""), version);
    let done = conn
        .set_then_eval((temp, value, ttl), PUBLISH_SCRIPT, keys, args)
        .await?;
    Ok(published(done))
}

/// Releases the fill lease of `key` if `token` still holds it, and announces that it is free.
pub async fn release_lease(shard: &Shard, key: &Key, token: &str) -> Result<bool, ShardError> {
    let event = Event::Released(key.redis_key()).encode();
    let args = vec![
        Value::from(token),
        Value::from(channel()),
        Value::from(event),
    ];
    let done: i64 = shard
        .eval(RELEASE_SCRIPT, vec![key.lease_key()], args)
        .await?;
    Ok(done == 1)
}

/// Merges `quarantines` (field, end in unix ms) into the shard's quarantine hash (see
/// [`QUARANTINE_SYNC_SCRIPT`]); `known` is the token this caller saw last.
pub async fn sync_quarantine<'a>(
    shard: &Shard,
    known: &str,
    quarantines: impl IntoIterator<Item = (&'a str, i64)>,
) -> Result<QuarantineSync, ShardError> {
    let mut args: Vec<Value> = vec![
        Value::from(VARIANTS_PREFIX),
        Value::from(TOMBSTONE_PREFIX),
        Value::from(ORIGIN_TOMBSTONE_PREFIX),
        Value::from(known),
    ];
    for (field, until) in quarantines {
        args.extend([Value::from(field), Value::from(until)]);
    }
    let reply: Vec<Value> = shard
        .eval(
            QUARANTINE_SYNC_SCRIPT,
            vec![QUARANTINE_KEY.to_owned()],
            args,
        )
        .await?;
    let mut reply = reply.into_iter();
    let n = reply.next().and_then(|v| v.as_u64()).unwrap_or(0);
    let lacked: Vec<String> = reply
        .by_ref()
        .take(n as usize)
        .filter_map(|v| v.as_string())
        .collect();
    let token = reply.next().and_then(|v| v.as_string()).unwrap_or_default();
    let mut held = Vec::new();
    while let (Some(field), Some(until)) = (reply.next(), reply.next()) {
        if let (Some(field), Some(until)) = (field.as_string(), until.as_i64()) {
            held.push((field, until));
        }
    }
    let changed = token != known;
    Ok(QuarantineSync {
        lacked,
        held: changed.then_some(held),
        token,
    })
}

/// Deletes `key` (with `all_variants`, every object in its media's variant index), first
/// quarantining the media until `quarantine` (unix ms) if given, and announces both; one atomic
/// step (see [`PURGE_SCRIPT`]). Returns the objects deleted.
pub async fn purge(
    shard: &Shard,
    key: &Key,
    all_variants: bool,
    quarantine: Option<i64>,
) -> Result<u64, ShardError> {
    let (field, until) = match quarantine {
        Some(until) => (quarantine_field(key.origin(), key.media_id()), until),
        None => (String::new(), 0),
    };
    let announce = if field.is_empty() {
        String::new()
    } else {
        Event::Quarantine {
            field: field.clone(),
            until,
        }
        .encode()
    };
    let purged = Event::Purge {
        key: key.clone(),
        all_variants,
    };
    let args: Vec<Value> = vec![
        Value::from(if all_variants { "1" } else { "0" }),
        Value::from(field),
        Value::from(until),
        Value::from(channel()),
        Value::from(purged.encode()),
        Value::from(announce),
    ];
    let keys = vec![
        key.redis_key(),
        key.variants_key(),
        QUARANTINE_KEY.to_owned(),
        tombstone_key(key.origin(), key.media_id()),
    ];
    shard.eval(PURGE_SCRIPT, keys, args).await
}

/// Tells every replica subscribed to the shard that `field` is quarantined until `until` (unix
/// ms), so each refuses its Puts at once rather than at its next quarantine sync.
pub async fn announce_quarantine(
    shard: &Shard,
    field: String,
    until: i64,
) -> Result<(), ShardError> {
    shard
        .publish(&channel(), Event::Quarantine { field, until }.encode())
        .await
}

/// Tells every replica subscribed to the shard to drop `origin` from its memory tier.
pub async fn announce_origin_purge(shard: &Shard, origin: &str) -> Result<(), ShardError> {
    let event = Event::PurgeOrigin(origin.to_owned()).encode();
    shard.publish(&channel(), event).await
}

#[cfg(test)]
mod tests {
    use fred::error::{Error, ErrorKind};
    use fred::prelude::Value;

    use super::piece_written;
    use crate::shard::ShardError;

    fn reply(message: &'static str, kind: ErrorKind) -> Result<Vec<Value>, ShardError> {
        Err(ShardError::Reply {
            shard: "a".into(),
            source: Error::new(kind, message),
        })
    }

    #[test]
    fn a_piece_counts_as_written_only_when_both_scripts_say_so() {
        let ok = |grown: i64, done: i64| Ok(vec![grown.into(), 3_000_000.into(), done.into()]);
        assert!(piece_written(ok(1, 1)).unwrap());
        assert!(!piece_written(ok(0, 1)).unwrap());
        assert!(!piece_written(ok(1, 0)).unwrap());
        assert!(!piece_written(Ok(vec![])).unwrap());
    }

    #[test]
    fn a_piece_refused_on_the_lost_keys_hash_is_lost_and_any_other_error_fails() {
        let wrong_type = "WRONGTYPE Operation against a key holding the wrong kind of value";
        assert!(!piece_written(reply(wrong_type, ErrorKind::InvalidArgument)).unwrap());
        // The counter may have moved on past these: the write must fail, not count as lost or
        // written.
        for refused in [
            "OOM command not allowed when used memory > 'maxmemory'.",
            "ERR string exceeds maximum allowed size (proto-max-bulk-len)",
            "EXECABORT Transaction discarded because of previous errors.",
        ] {
            assert!(
                piece_written(reply(refused, ErrorKind::Unknown)).is_err(),
                "{refused}"
            );
        }
        let timeout = Err(ShardError::Fault {
            shard: "a".into(),
            source: Error::new(ErrorKind::Timeout, "Request timed out."),
        });
        assert!(piece_written(timeout).is_err());
    }
}
