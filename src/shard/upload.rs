//! A long value sent to its shard as one `SET`, its bytes streamed as they arrive, over a
//! connection of its own.
//!
//! Written in pieces, a long value cost its shard about twice what a `SET` of the same bytes
//! does: each piece is read into an argument of its own and copied into the value, and the value
//! is copied again each time it grows. One `SET` whose value is a bulk string of the whole length
//! lets Redis read the bytes straight into the buffer that becomes the value (for an argument of
//! 32 KiB or more it sizes its read buffer to the argument and keeps it), so the shard copies
//! nothing. The Redis client cannot send an argument it does not hold whole, so this writes the
//! command itself, on a connection opened as the pool's are (TLS, `AUTH`, `SELECT`) and closed
//! after it: a partly sent command on it belongs to no one else, and an upload given up before
//! its last byte closes the connection before the shard ever runs the command, leaving nothing.
//! (One given up after that may still be run by the shard; its temporary key then expires.)
//!
//! The cost moves to memory: the shard reserves the whole value's room, counted in its
//! `used_memory`, as soon as the `SET`'s length arrives, and for a moment holds twice it when the
//! command runs (Redis makes a new read buffer of the same size after a large argument, until
//! the connection closes). So the uploads one replica has in flight to one shard hold at most
//! [`UPLOAD_MIB_PER_POOL_CONNECTION`] MiB per connection of its pool (256 MiB with the default
//! `pool_size` of 4), counted by the values' whole lengths; a Put past that is written in
//! pieces.
//!
//! A failed upload fails its Put but does not mark the shard down: the pool's own connections and
//! health checks judge the shard, and what goes wrong on an upload's connection (a limit of the
//! shard's on bulk strings, query buffers or clients, a connection closed after an idle client
//! pause) says little about them.

use std::sync::Arc;
use std::time::Duration;

use fred::prelude::{Error, ErrorKind};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::rustls;
use tracing::{debug, warn};

use super::{Direct, Shard, ShardError};

/// The longest reply line read (an error message).
const MAX_REPLY: usize = 4096;

/// MiB of values one replica may be uploading to one shard at once, per connection of its pool.
pub const UPLOAD_MIB_PER_POOL_CONNECTION: usize = 64;

const MIB: u64 = 1024 * 1024;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl Direct {
    /// Connects, with TLS when the pool uses it, and authenticates and selects the database as
    /// the pool does: the connection within the connect timeout, the rest within the command
    /// timeout.
    async fn open(&self, command_timeout: Duration) -> Result<Box<dyn Io>, Error> {
        // A URL's IPv6 host keeps its brackets, which an address does not have.
        let host = self.host.trim_start_matches('[').trim_end_matches(']');
        let connect = async {
            let tcp = TcpStream::connect((host, self.port)).await?;
            tcp.set_nodelay(true)?;
            Ok::<Box<dyn Io>, Error>(match &self.tls {
                Some(tls) => {
                    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
                        .map_err(|e| Error::new(ErrorKind::Tls, e.to_string()))?;
                    let connector = tokio_rustls::TlsConnector::from(tls.clone());
                    Box::new(connector.connect(name, tcp).await?)
                }
                None => Box::new(tcp),
            })
        };
        let mut io = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(io) => io?,
            Err(_) => return Err(Error::new(ErrorKind::Timeout, "connection timed out")),
        };
        let login = async {
            if let Some(password) = &self.password {
                let mut words = vec!["AUTH".as_bytes()];
                if let Some(user) = &self.username {
                    words.push(user.as_bytes());
                }
                words.push(password.as_bytes());
                command(&mut io, &words).await?;
            }
            if let Some(db) = self.database {
                command(&mut io, &[b"SELECT", db.to_string().as_bytes()]).await?;
            }
            Ok::<_, Error>(())
        };
        match tokio::time::timeout(command_timeout, login).await {
            Ok(done) => done.map(|()| io),
            Err(_) => Err(Error::new(ErrorKind::Timeout, "login timed out")),
        }
    }
}

/// Appends `word` to a command as a RESP bulk string.
fn push_bulk(out: &mut Vec<u8>, word: &[u8]) {
    out.extend_from_slice(format!("${}\r\n", word.len()).as_bytes());
    out.extend_from_slice(word);
    out.extend_from_slice(b"\r\n");
}

/// Sends one command and reads its answer, which must be a simple string.
async fn command(io: &mut Box<dyn Io>, words: &[&[u8]]) -> Result<(), Error> {
    let mut out = format!("*{}\r\n", words.len()).into_bytes();
    for w in words {
        push_bulk(&mut out, w);
    }
    io.write_all(&out).await?;
    io.flush().await?;
    read_status(io).await
}

/// Reads one reply: `+…` is success, `-…` the shard's error (as fred reports it: its code and
/// message, of no kind of its own), anything else a protocol error.
async fn read_status<R: AsyncRead + Unpin + ?Sized>(io: &mut R) -> Result<(), Error> {
    let mut line = Vec::with_capacity(64);
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        if line.len() >= MAX_REPLY {
            return Err(Error::new(ErrorKind::Protocol, "reply line too long"));
        }
        if io.read(&mut byte).await? == 0 {
            return Err(Error::new(
                ErrorKind::IO,
                "connection closed before the reply",
            ));
        }
        line.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&line[1.min(line.len() - 2)..line.len() - 2]);
    match line[0] {
        b'+' => Ok(()),
        b'-' => Err(Error::new(ErrorKind::Unknown, text.into_owned())),
        _ => Err(Error::new(
            ErrorKind::Protocol,
            format!("unexpected reply {:?}", String::from_utf8_lossy(&line)),
        )),
    }
}

/// `SET key value PX ttl` on its way, the value's bytes sent as they come.
pub struct Upload {
    shard: Arc<Shard>,
    io: Box<dyn Io>,
    /// Value bytes still to send.
    left: u64,
    /// The arguments after the value.
    tail: Vec<u8>,
    _slot: OwnedSemaphorePermit,
}

/// Room for one upload among those this replica has in flight to a shard.
pub struct UploadSlot {
    len: u64,
    permit: OwnedSemaphorePermit,
}

impl Shard {
    /// Room to send a value (header and body) of `len` bytes as one `SET`: `None` when it is
    /// longer than `redis.upload_max_bytes`, or the uploads under way to this shard already hold
    /// what this replica allows itself.
    pub fn upload_slot(&self, len: u64) -> Option<UploadSlot> {
        if len > self.redis.upload_max_bytes {
            return None;
        }
        let mib = u32::try_from(len.div_ceil(MIB)).unwrap_or(u32::MAX);
        let Ok(permit) = self.upload_slots.clone().try_acquire_many_owned(mib) else {
            debug!(shard = %self.name, len, "uploads at their limit: writing in pieces");
            return None;
        };
        Some(UploadSlot { len, permit })
    }

    /// Opens a connection of its own to this shard and starts `SET key value PX ttl` for the
    /// value `slot` was taken for, sending `first` of its bytes.
    pub async fn upload(
        self: &Arc<Self>,
        slot: UploadSlot,
        key: &str,
        ttl: Duration,
        first: &[u8],
    ) -> Result<Upload, ShardError> {
        self.check_up()?;
        let io = self
            .direct
            .open(self.command_timeout)
            .await
            .map_err(|e| self.upload_failed(e))?;
        let mut head = b"*5\r\n".to_vec();
        push_bulk(&mut head, b"SET");
        push_bulk(&mut head, key.as_bytes());
        head.extend_from_slice(format!("${}\r\n", slot.len).as_bytes());
        let mut tail = b"\r\n".to_vec();
        push_bulk(&mut tail, b"PX");
        push_bulk(&mut tail, ttl.as_millis().max(1).to_string().as_bytes());
        let mut upload = Upload {
            shard: self.clone(),
            io,
            left: slot.len,
            tail,
            _slot: slot.permit,
        };
        upload.raw(&head).await?;
        upload.send(first).await?;
        Ok(upload)
    }

    /// The error of a failed upload, logged with its cause; the shard is not marked down.
    fn upload_failed(&self, e: Error) -> ShardError {
        warn!(shard = %self.name, error = %e, "upload failed");
        self.classify(e)
    }
}

impl Upload {
    /// Sends the next bytes of the value; more than it was announced with is an error, and
    /// nothing is sent.
    pub async fn send(&mut self, data: &[u8]) -> Result<(), ShardError> {
        if data.len() as u64 > self.left {
            return Err(self.misuse("more bytes than the value was announced with".into()));
        }
        self.raw(data).await?;
        self.left -= data.len() as u64;
        Ok(())
    }

    /// Ends the command once the whole value was sent, and waits for the shard's answer. The
    /// connection is then closed from the shard's side (`QUIT`), in the background, so that
    /// closed connections do not pile up in this host's `TIME_WAIT`.
    pub async fn finish(mut self) -> Result<(), ShardError> {
        if self.left != 0 {
            let left = self.left;
            return Err(self.misuse(format!("{left} bytes of the value were never sent")));
        }
        let tail = std::mem::take(&mut self.tail);
        self.raw(&tail).await?;
        let started = std::time::Instant::now();
        let io = &mut self.io;
        bounded(&self.shard, async {
            io.flush().await?;
            read_status(io).await
        })
        .await?;
        self.shard.observe(started);
        let Upload {
            shard,
            mut io,
            _slot,
            ..
        } = self;
        let wait = shard.command_timeout;
        tokio::spawn(async move {
            let quit = async {
                io.write_all(b"*1\r\n$4\r\nQUIT\r\n").await?;
                io.flush().await?;
                let mut rest = [0u8; 64];
                while io.read(&mut rest).await? > 0 {}
                Ok::<_, std::io::Error>(())
            };
            match tokio::time::timeout(wait, quit).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(error = %e, "upload connection closed uncleanly"),
                Err(_) => debug!("shard did not close an upload connection after QUIT"),
            }
            drop(_slot);
        });
        Ok(())
    }

    /// An upload used against its announced length: refused, nothing sent.
    fn misuse(&self, what: String) -> ShardError {
        ShardError::Reply {
            shard: self.shard.name().to_owned(),
            source: Error::new(ErrorKind::InvalidArgument, what),
        }
    }

    /// Writes bytes of the command, under the command timeout: a shard that stops reading them
    /// fails the upload as a stalled command fails.
    async fn raw(&mut self, data: &[u8]) -> Result<(), ShardError> {
        let io = &mut self.io;
        bounded(&self.shard, async { Ok(io.write_all(data).await?) }).await
    }
}

/// Runs one step of an upload under the command timeout, ended early if the shard is found down;
/// a failure does not mark the shard down.
async fn bounded<R>(
    shard: &Shard,
    step: impl std::future::Future<Output = Result<R, Error>>,
) -> Result<R, ShardError> {
    shard.bounded_as(step, |e| shard.upload_failed(e)).await
}

#[cfg(test)]
mod tests {
    use super::super::is_fault;
    use super::*;

    async fn reply(bytes: &[&[u8]]) -> Result<(), Error> {
        let (mut a, mut b) = tokio::io::duplex(64);
        let parts: Vec<Vec<u8>> = bytes.iter().map(|p| p.to_vec()).collect();
        let writer = tokio::spawn(async move {
            for p in parts {
                // Fails once the reader gave up (a line too long): nothing more to send.
                if a.write_all(&p).await.is_err() {
                    return;
                }
                tokio::task::yield_now().await;
            }
        });
        let got = read_status(&mut b).await;
        drop(b);
        writer.await.unwrap();
        got
    }

    #[tokio::test]
    async fn replies_are_read_whole_however_they_arrive() {
        reply(&[b"+OK\r\n"]).await.unwrap();
        reply(&[b"+O", b"K\r", b"\n"]).await.unwrap();
        let e = reply(&[b"-OOM command not allowed\r\n"]).await.unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::Unknown);
        assert_eq!(e.details(), "OOM command not allowed");
        assert!(!is_fault(&e), "the shard's answer, not a fault");
    }

    #[tokio::test]
    async fn malformed_replies_are_errors_not_panics() {
        for bad in [&b"\r\n"[..], b":1\r\n", b"$3\r\nabc\r\n"] {
            let e = reply(&[bad]).await.unwrap_err();
            assert_eq!(e.kind(), &ErrorKind::Protocol, "{bad:?}");
        }
        let e = reply(&[b"+OK"]).await.unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::IO, "closed before the line ended");
        let long = vec![b'-'; MAX_REPLY + 10];
        let e = reply(&[&long]).await.unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::Protocol);
    }
}
