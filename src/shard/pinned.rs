//! One connection of a shard, held for the length of a write so that its commands (and the
//! clean-up of an abandoned write) reach Redis in the order they were sent.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fred::clients::{Pipeline, WithOptions};
use fred::prelude::*;
use futures_util::future::try_join;
use futures_util::FutureExt;

use super::{Shard, ShardError};

pub struct Pinned {
    shard: Arc<Shard>,
    client: Client,
}

impl Shard {
    /// Pins one connection for a write.
    pub fn pin(self: &Arc<Self>) -> Result<Pinned, ShardError> {
        let client = self.client()?.clone();
        Ok(Pinned {
            shard: self.clone(),
            client,
        })
    }
}

impl Pinned {
    pub fn shard(&self) -> &Arc<Shard> {
        &self.shard
    }

    /// This connection with the shard's per-call options (timeout, fail fast, one attempt).
    fn connection(&self) -> WithOptions<Client> {
        self.client.with_options(&self.shard.options())
    }

    /// A pipeline on this connection, with the shard's per-call options.
    fn pipeline(&self) -> Pipeline<WithOptions<Client>> {
        Pipeline::from(self.connection())
    }

    /// Runs a Lua script on this connection, under the command timeout, its round trip counted
    /// in the shard's latency; it ends at once when the shard is found down meanwhile, so use it
    /// only where giving up early leaves nothing half-done that the caller must know about.
    pub async fn eval_bounded<R: FromValue>(
        &self,
        script: &'static str,
        keys: Vec<String>,
        args: Vec<Value>,
    ) -> Result<R, ShardError> {
        let started = std::time::Instant::now();
        self.shard.check_up()?;
        let reply = self
            .shard
            .bounded(self.connection().eval(script, keys, args))
            .await?;
        self.shard.observe(started);
        Ok(reply)
    }

    /// Runs a Lua script on this connection and waits for its answer (up to the command
    /// timeout) even if the shard is found down meanwhile: the script may have run, and the
    /// caller must not report otherwise on a guess.
    pub async fn eval<R: FromValue>(
        &self,
        script: &'static str,
        keys: Vec<String>,
        args: Vec<Value>,
    ) -> Result<R, ShardError> {
        let started = std::time::Instant::now();
        let reply = self.shard.eval_on(&self.client, script, keys, args).await?;
        self.shard.observe(started);
        Ok(reply)
    }

    /// `SET key value PX ttl`.
    pub async fn set(&self, key: &str, value: Bytes, ttl: Duration) -> Result<(), ShardError> {
        self.shard.check_up()?;
        self.connection()
            .set::<(), _, _>(
                key,
                value,
                Some(Expiration::PX(ttl.as_millis() as i64)),
                None,
                false,
            )
            .await
            .map_err(|e| self.shard.fail(e))
    }

    /// `SET key value PX ttl`, then a Lua script, in one round trip on this connection (and
    /// usually one write: the two are joined as the shard's reads join theirs): the script sees
    /// the value. Waits for the answer like [`Pinned::eval`]. If the `SET` fails the script
    /// may still run; it then finds no value of the expected length and publishes nothing.
    pub async fn set_then_eval<R: FromValue>(
        &self,
        (key, value, ttl): (&str, Bytes, Duration),
        script: &'static str,
        keys: Vec<String>,
        args: Vec<Value>,
    ) -> Result<R, ShardError> {
        self.shard.check_up()?;
        let started = std::time::Instant::now();
        let c = self.connection();
        let px = Some(Expiration::PX(ttl.as_millis() as i64));
        let (_, reply): ((), R) = try_join(
            c.set(key, value, px, None, false).boxed(),
            c.eval(script, keys, args).boxed(),
        )
        .await
        .map_err(|e| self.shard.fail(e))?;
        self.shard.observe(started);
        Ok(reply)
    }

    /// A Lua script, `SETRANGE key offset data`, and another script on the same key, as one
    /// `MULTI`/`EXEC` on this connection: nothing else runs on the shard between them (no other
    /// client, no eviction, no expiry), and the scripts judge the write without the data
    /// passing through Lua. Returns the three replies; an error reply of any of them is the
    /// transaction's error (the others still ran). Bounded like [`Pinned::eval_bounded`].
    ///
    /// The transaction goes as a pipeline of its own `MULTI` and `EXEC`: the client writes a
    /// pipeline's commands one after another, with nothing of another request between them, and
    /// other requests on the connection are not held while it runs (the client's own
    /// transactions wait for every command in flight first and hold the connection for the
    /// round trip).
    pub async fn write_between(
        &self,
        (before, before_args): (&'static str, Vec<Value>),
        (key, offset, data): (&str, u64, Bytes),
        (after, after_args): (&'static str, Vec<Value>),
    ) -> Result<Vec<Value>, ShardError> {
        use fred::types::CustomCommand;
        self.shard.check_up()?;
        let started = std::time::Instant::now();
        let p = self.pipeline();
        let keys = vec![key.to_owned()];
        let word = |w: &'static str| CustomCommand::new_static(w, None::<u16>, false);
        let queued: Result<(), Error> = async {
            p.custom::<(), Value>(word("MULTI"), Vec::new()).await?;
            super::queue_eval(&p, before, keys.clone(), before_args).await?;
            // A Redis string ends at 512 MiB, far inside a u32.
            let offset = u32::try_from(offset)
                .map_err(|_| Error::new(ErrorKind::InvalidArgument, "offset past 4 GiB"))?;
            p.setrange::<(), _, _>(key, offset, data).await?;
            super::queue_eval(&p, after, keys, after_args).await?;
            p.custom::<(), Value>(word("EXEC"), Vec::new()).await
        }
        .await;
        queued.map_err(|e| self.shard.fail(e))?;
        let mut replies = self
            .shard
            .bounded(async { Ok(p.try_all::<Value>().await) })
            .await?;
        // MULTI, three QUEUED and EXEC; a command the shard refused to queue (out of memory,
        // say) answers with its error and makes EXEC fail. A lost connection is one error.
        let exec = replies.pop();
        if let Some(refused) = replies.into_iter().find_map(Result::err) {
            return Err(self.shard.fail(refused));
        }
        let replies = match exec {
            Some(Ok(Value::Array(replies))) => replies,
            Some(Err(e)) => return Err(self.shard.fail(e)),
            other => {
                let e = Error::new(ErrorKind::Protocol, format!("EXEC answered {other:?}"));
                return Err(self.shard.fail(e));
            }
        };
        self.shard.observe(started);
        Ok(replies)
    }

    /// Deletes a key on this connection, after every command sent before it.
    pub async fn del(&self, key: &str) -> Result<(), ShardError> {
        self.connection()
            .del::<(), _>(key)
            .await
            .map_err(|e| self.shard.fail(e))
    }
}
