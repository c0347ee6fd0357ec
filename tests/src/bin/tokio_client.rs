//! Tokio test client: `tokio_client HOST PORT BYTES`. Sends BYTES (a 1 MiB
//! pattern), half-closes, reads the echo to EOF, prints one JSON object with
//! both SHA-256 digests.

use sha2::{Digest as _, Sha256};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, host, port, bytes] = args.as_slice() else {
        anyhow::bail!("usage: tokio_client HOST PORT BYTES");
    };
    let total: usize = bytes.parse()?;
    let stream = TcpStream::connect((host.as_str(), port.parse::<u16>()?)).await?;
    let local = stream.local_addr()?;
    let peer = stream.peer_addr()?;
    let (mut r, mut w) = stream.into_split();
    let pattern: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let send = async move {
        let mut h = Sha256::new();
        let mut sent = 0;
        while sent < total {
            let n = pattern.len().min(total - sent);
            w.write_all(&pattern[..n]).await?;
            h.update(&pattern[..n]);
            sent += n;
        }
        w.shutdown().await?;
        anyhow::Ok(hex(&h.finalize()))
    };
    let recv = async move {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut n_total = 0usize;
        loop {
            let n = r.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            n_total += n;
        }
        anyhow::Ok((hex(&h.finalize()), n_total))
    };
    let (sent_sha, (recv_sha, received)) = tokio::try_join!(send, recv)?;
    let out = serde_json::json!({
        "pid": std::process::id(),
        "local": [local.ip().to_string(), local.port()],
        "peer": [peer.ip().to_string(), peer.port()],
        "sent": total, "received": received,
        "sent_sha256": sent_sha, "recv_sha256": recv_sha,
    });
    println!("{out}");
    Ok(())
}

fn hex(b: &[u8]) -> String {
    use std::fmt::Write as _;
    b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}
