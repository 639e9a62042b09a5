//! The floor under a commit's latency on this machine: fdatasync on the data directory's disk
//! and a loopback TCP round trip, measured just before each load.

use anyhow::Context;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Instant;

use super::segments::quantile;

/// The floor measured before a load, in ns (p50s).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Floor {
    /// fdatasync of a small write in the data directory, median.
    pub fsync_p50: u64,
    /// fdatasync, 90th percentile.
    pub fsync_p90: u64,
    /// Loopback TCP round trip, median.
    pub rtt_p50: u64,
    /// Loopback TCP round trip, 90th percentile.
    pub rtt_p90: u64,
}

impl Floor {
    /// One leader fdatasync + one follower fdatasync + two loopback round trips.
    pub fn total(&self) -> u64 {
        self.fsync_p50
            .saturating_mul(2)
            .saturating_add(self.rtt_p50.saturating_mul(2))
    }
}

/// The raw durations (ns) behind a [`Floor`]: measurements taken at several moments are pooled
/// before their percentiles are taken, so one noisy moment weighs only its share.
#[derive(Debug, Clone, Default)]
pub struct FloorSamples {
    /// fdatasync durations.
    pub fsync: Vec<u64>,
    /// Loopback round-trip durations.
    pub rtt: Vec<u64>,
}

impl FloorSamples {
    /// Pools `other`'s samples with these.
    pub fn extend(&mut self, other: FloorSamples) {
        self.fsync.extend(other.fsync);
        self.rtt.extend(other.rtt);
    }

    /// The percentiles of the pooled samples (0 where there are none).
    pub fn floor(&self) -> Floor {
        let q = |v: &[u64], p| quantile(&mut v.to_vec(), p).unwrap_or(0);
        Floor {
            fsync_p50: q(&self.fsync, 0.5),
            fsync_p90: q(&self.fsync, 0.9),
            rtt_p50: q(&self.rtt, 0.5),
            rtt_p90: q(&self.rtt, 0.9),
        }
    }
}

/// [`measure_floor_samples`], summarised.
pub fn measure_floor(dir: &Path, n: usize) -> anyhow::Result<Floor> {
    Ok(measure_floor_samples(dir, n)?.floor())
}

/// `n` appends of 128 bytes to a probe file in `dir`, each followed by fdatasync (what a log
/// append costs the disk), then `n` ping-pongs of 32 bytes over loopback TCP between two
/// threads. The probe file is removed.
pub fn measure_floor_samples(dir: &Path, n: usize) -> anyhow::Result<FloorSamples> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("hops-fsync-probe");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut fsync = Vec::with_capacity(n);
    let rec = [b'x'; 128];
    for _ in 0..n {
        let t = Instant::now();
        f.write_all(&rec)?;
        f.sync_data()?;
        fsync.push(t.elapsed().as_nanos() as u64);
    }
    drop(f);
    let _ = std::fs::remove_file(&path);

    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut buf = [0u8; 32];
        loop {
            match s.read_exact(&mut buf) {
                Ok(()) => s.write_all(&buf)?,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    });
    let mut c = std::net::TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    let mut rtt = Vec::with_capacity(n);
    let mut buf = [7u8; 32];
    for _ in 0..n {
        let t = Instant::now();
        c.write_all(&buf)?;
        c.read_exact(&mut buf)?;
        rtt.push(t.elapsed().as_nanos() as u64);
    }
    drop(c);
    let _ = echo.join();
    Ok(FloorSamples { fsync, rtt })
}
