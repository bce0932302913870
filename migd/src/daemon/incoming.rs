//! Incoming migrations: a TCP listener; per connection the destination half of the
//! handshake, then a VM process that receives the VM over the inherited socket.

use std::net::{SocketAddr, TcpStream};

use link::Link;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tracing::Instrument;

use super::api::memory_arg;
use super::state::{self, st, Origin, VmEntry, VmRecord};
use super::vmproc;
use super::Daemon;
use migration::deadline::Deadline;

/// How long a peer may take to send its Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the whole handshake (TLS, Hello, Accept, Boot) may take: a peer
/// that trickles bytes in under every read timeout is cut off here.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(30);
/// How long a cost-model probe may take, handshake included (its 32 MiB
/// need 5 minutes at 0.9 Mbit/s): it holds a handshake slot meanwhile, so a
/// peer that trickles pages in under every read timeout is cut off here.
const PROBE_DEADLINE: Duration = Duration::from_secs(300);

fn probe_deadline() -> Duration {
    migration::faults::knob_ms("MIGD_PROBE_DEADLINE_MS").unwrap_or(PROBE_DEADLINE)
}

/// Handshakes in progress at most, in all and from one peer (each holds a
/// blocking thread until its peer is done or cut off), so that one peer
/// cannot keep the others out.
static HANDSHAKES: Places = Places::new(64, 8, "handshakes in progress");
/// How long a connection beyond them waits for a slot before it is dropped.
const SLOT_WAIT: Duration = Duration::from_secs(5);
/// Connections not yet handshaking (waiting for their first bytes, or for
/// a handshake slot), at most, in all and from one peer: each holds a
/// descriptor, and a crowd of silent connections must not take all of the
/// daemon's (its control socket and the VMs' own then fail). One beyond
/// them is closed at once. In all: a quarter of the daemon's descriptors
/// (16384 under the unit's LimitNOFILE; the daemon raises its soft limit
/// to the hard one), at least 1024 but never over half of them: so many
/// peers (addresses, IPv6 /64s) it takes to keep the listener shut to
/// others, and the daemon keeps descriptors for its own work.
static WAITING: std::sync::LazyLock<Places> = std::sync::LazyLock::new(|| {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `lim`, which we own.
    let nofile = match unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } {
        0 => lim.rlim_cur,
        _ => 0,
    };
    let quarter = usize::try_from(nofile / 4).unwrap_or(usize::MAX);
    let half = usize::try_from(nofile / 2).unwrap_or(usize::MAX);
    let all = quarter.max(1024).min(half).max(64);
    Places::new(all, 32, "connections not yet handshaking")
});
/// How long a peer may take to send its first bytes (a source sends its TLS
/// ClientHello or its Hello at once).
const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);

/// Counted places, in all and per peer (an IPv4 address, or an IPv6 /64:
/// one host holds a whole /64).
struct Places {
    taken: std::sync::Mutex<std::collections::BTreeMap<std::net::IpAddr, usize>>,
    all: usize,
    per_peer: usize,
    what: &'static str,
}

/// One of [`Places`], given back when dropped.
struct Place(&'static Places, std::net::IpAddr);

/// The peer an address counts as: its /64 for IPv6 (an IPv4-mapped one as
/// its IPv4 address).
fn peer_key(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.into(),
            None => std::net::Ipv6Addr::from(v6.to_bits() & !((1u128 << 64) - 1)).into(),
        },
        v4 => v4,
    }
}

impl Places {
    const fn new(all: usize, per_peer: usize, what: &'static str) -> Places {
        Places {
            taken: std::sync::Mutex::new(std::collections::BTreeMap::new()),
            all,
            per_peer,
            what,
        }
    }

    fn take(&'static self, ip: std::net::IpAddr) -> Result<Place> {
        let key = peer_key(ip);
        let mut m = self.taken.lock().unwrap_or_else(|p| p.into_inner());
        let all: usize = m.values().sum();
        let mine = m.get(&key).copied().unwrap_or(0);
        if all >= self.all || mine >= self.per_peer {
            anyhow::bail!(
                "{all} {} ({mine} from {key}), at most {} ({} from one address or IPv6 /64): \
                 connection dropped",
                self.what,
                self.all,
                self.per_peer
            );
        }
        m.insert(key, mine + 1);
        Ok(Place(self, key))
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut m = self.0.taken.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// Logs why a connection came to nothing, at most 20 times in 10 s (a
/// flood of them must not bury the daemon's other messages, or hit the
/// journal's rate limit); then how many went unlogged.
fn warn_limited(e: &anyhow::Error) {
    static WINDOW: std::sync::Mutex<Option<(Instant, u32, u64)>> = std::sync::Mutex::new(None);
    let mut w = WINDOW.lock().unwrap_or_else(|p| p.into_inner());
    let now = Instant::now();
    let (start, logged, unlogged) = w.get_or_insert((now, 0, 0));
    if now.duration_since(*start) >= Duration::from_secs(10) {
        if *unlogged > 0 {
            tracing::warn!("{unlogged} more incoming connections came to nothing in 10 s (not logged one by one)");
        }
        (*start, *logged, *unlogged) = (now, 0, 0);
    }
    if *logged < 20 {
        *logged += 1;
        tracing::warn!("incoming migration not started: {e:#}");
    } else {
        *unlogged += 1;
    }
}

/// [`HANDSHAKE_DEADLINE`], which tests shorten with
/// `MIGD_HANDSHAKE_DEADLINE_MS` (honoured only with fault injection on).
fn handshake_deadline() -> Duration {
    migration::faults::knob_ms("MIGD_HANDSHAKE_DEADLINE_MS").unwrap_or(HANDSHAKE_DEADLINE)
}

/// Binds the listener and serves it in the background.
pub async fn start(d: Arc<Daemon>) -> Result<()> {
    let l = TcpListener::bind(&d.cfg.listen)
        .await
        .with_context(|| format!("binding the migration listener {}", d.cfg.listen))?;
    tracing::info!(addr = %l.local_addr()?, "listening for incoming migrations");
    tokio::spawn(async move {
        loop {
            match l.accept().await {
                Ok((s, peer)) => {
                    let span = tracing::info_span!("incoming", %peer);
                    let waiting = match WAITING.take(peer.ip()) {
                        Ok(place) => place,
                        Err(e) => {
                            // Closed at once: no task, no descriptor kept.
                            drop(s);
                            span.in_scope(|| warn_limited(&e));
                            continue;
                        }
                    };
                    let d = d.clone();
                    tokio::spawn(
                        async move {
                            if let Err(e) = connection(d, s, peer, waiting).await {
                                warn_limited(&e);
                            }
                        }
                        .instrument(span),
                    );
                }
                Err(e) => {
                    tracing::warn!("accepting a migration connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(())
}

async fn connection(
    d: Arc<Daemon>,
    s: tokio::net::TcpStream,
    peer: SocketAddr,
    waiting: Place,
) -> Result<()> {
    // Until its first bytes arrive a connection costs a task and one of
    // the `WAITING` places, not one of the blocking threads that the
    // handshakes run on: a crowd of silent connections cannot hold up a
    // real migration.
    // (`peek`, not `readable`: tokio reports a fresh socket readable at once.)
    let first = tokio::time::timeout(FIRST_BYTES_TIMEOUT, s.peek(&mut [0u8; 1]))
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "the peer sent nothing in {} s",
                FIRST_BYTES_TIMEOUT.as_secs()
            )
        })?
        .context("waiting for the peer's first bytes")?;
    if first == 0 {
        anyhow::bail!("the peer closed the connection before its Hello");
    }
    // A connection beyond the caps waits a while for a slot (a legitimate
    // handshake takes milliseconds), then is dropped.
    let waited = Instant::now();
    let slot = loop {
        match HANDSHAKES.take(peer.ip()) {
            Ok(slot) => break slot,
            Err(e) if waited.elapsed() >= SLOT_WAIT => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    drop(waiting);
    let stream = s.into_std()?;
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(HELLO_TIMEOUT))?;
    let d2 = d.clone();
    let done = tokio::task::spawn_blocking(move || {
        let mut deadline = Deadline::start(stream.try_clone()?, handshake_deadline());
        let done =
            secure(&d2, stream, peer).and_then(|link| handshake(&d2, link, peer, &mut deadline));
        // Lifted before it is judged: a handshake that made it cannot be
        // cut afterwards, and one cut as it made it fails here.
        if deadline.lift() {
            if let Ok(Some((_, record))) = &done {
                // Admitted as the deadline cut it: nothing runs there yet.
                release(&d2, &record.name);
            }
            let e = done
                .err()
                .unwrap_or_else(|| anyhow::anyhow!("connection cut"));
            return Err(e.context(format!(
                "the peer did not complete its handshake within {:?}",
                deadline.limit()
            )));
        }
        done
    })
    .await
    .context("handshake task")?;
    drop(slot);
    let Some((stream, record)) = done? else {
        return Ok(());
    };
    let name = record.name.clone();
    let dir = d.vm_dir(&name);
    // From here on the name is reserved: any failure gives it back.
    let give_back = |e: anyhow::Error| {
        release(&d, &name);
        e
    };
    let mut args = vec![
        "--incoming-fd".to_string(),
        "3".into(),
        // One argument: a name can never be read as a flag of its own.
        format!("--name={name}"),
        "--memory".into(),
        memory_arg(record.memory),
        "--cpus".into(),
        record.vcpus.to_string(),
        "--serial".into(),
        state::console_path(&dir).to_string_lossy().into_owned(),
        "--control".into(),
        state::control_path(&dir).to_string_lossy().into_owned(),
        "--migrated-file".into(),
        state::migrated_path(&dir).to_string_lossy().into_owned(),
        "--unconfirmed-file".into(),
        state::unconfirmed_path(&dir).to_string_lossy().into_owned(),
        "--arrived-file".into(),
        state::arrived_path(&dir).to_string_lossy().into_owned(),
        format!("--postcopy-nice={}", d.cfg.postcopy_nice),
        format!("--dirty-ring={}", d.cfg.dirty_ring),
    ];
    args.extend(super::api::memory_flags(&d.cfg, false));
    if let Some(t) = &d.tls {
        args.extend(migd::tls_args::TlsArgs::to_args(&t.files));
    }
    // A TLS link's session state goes to the child through a pipe (fd 4), never
    // through the file system or the command line.
    let exported = stream.export().context("handing over the TLS session");
    let state_pipe = match exported.map_err(give_back)? {
        Some(state) => {
            let (r, mut w) = std::io::pipe()
                .context("pipe for the TLS session")
                .map_err(give_back)?;
            std::io::Write::write_all(&mut w, &state)
                .context("writing the TLS session")
                .map_err(give_back)?;
            args.extend(["--incoming-link-fd".to_string(), "4".into()]);
            Some(r)
        }
        None => None,
    };
    // The child gets the socket as fd 3; our copy closes when `stream` drops.
    let spawned = vmproc::spawn(
        &d.exe,
        &args,
        &state::log_path(&dir),
        &vmproc::lock_path(&dir),
        Some(stream.as_raw_fd()),
        state_pipe.as_ref().map(|p| p.as_raw_fd()),
    );
    match spawned {
        Ok(child) => {
            let pid = child.id();
            if let Some(vm) = d.reg().vms.get_mut(&name) {
                vm.pid = pid;
            }
            tracing::info!(vm = %name, ?pid, tls = stream.is_secure(), "receiving VM");
            state::watch_child(d.clone(), name, child);
            Ok(())
        }
        Err(e) => Err(give_back(e)),
    }
}

/// The link of an accepted connection: TLS when configured (the peer must be
/// one of ours), else plaintext; a peer speaking the other is told so.
fn secure(d: &Daemon, stream: TcpStream, peer: SocketAddr) -> Result<Link> {
    use migration::handshake::refuse;
    let tls_hello = link::looks_like_tls(&stream).unwrap_or(false);
    match &d.tls {
        Some(_) if !tls_hello => {
            // It reads plaintext frames: tell it in its own terms.
            let reason = "this host accepts migrations only over TLS";
            let _ = refuse(&mut Link::plain(stream), reason);
            anyhow::bail!("{peer} speaks plaintext: refused ({reason})")
        }
        Some(tls) => match tls.accept(stream) {
            Ok(link) => Ok(link),
            Err(link::LinkError::NotAPeer {
                peer,
                allowed,
                mut link,
            }) => {
                let reason = format!(
                    "this host does not accept migrations from {peer}: its certificate names \
                     none of the configured peers ({allowed})"
                );
                let _ = refuse(&mut *link, &reason);
                anyhow::bail!("{reason}")
            }
            Err(e) => Err(e.into()),
        },
        None => {
            if tls_hello {
                anyhow::bail!(
                    "{peer} speaks TLS, but this host runs without it (--insecure, no tls_* keys)"
                );
            }
            Ok(Link::plain(stream))
        }
    }
}

/// Gives back what [`admit`] reserved for an arrival that will not run
/// here: its name, its memory and its directory.
fn release(d: &Daemon, name: &str) {
    d.reg().vms.remove(name);
    let _ = state::remove_dir(&d.vm_dir(name));
}

/// Checks a Hello against this host; on success the name is reserved and the directory made.
fn admit(
    d: &Daemon,
    name: &str,
    memory: u64,
    vcpus: u32,
    peer: SocketAddr,
) -> Result<VmRecord, String> {
    state::check_name(name)?;
    if !(1..=8).contains(&vcpus) {
        return Err(format!("{vcpus} vCPUs: this host runs VMs of 1 to 8 vCPUs"));
    }
    // The VM library's bounds, before the source sends a page.
    if let Err(e) = vmm::memory::check_memory_bounds(memory) {
        return Err(format!("memory: {e}"));
    }
    // On huge pages the VM's memory is all reserved in the pool when made.
    let (available, whence) = if d.cfg.hugepages {
        (
            vmm::memory::huge_pages_available(),
            "free in its huge page pool",
        )
    } else {
        (vmm::memory::mem_available(), "available")
    };
    let available = available.unwrap_or(0);
    let dir = d.vm_dir(name);
    let record = VmRecord {
        name: name.to_string(),
        kernel: None,
        initramfs: None,
        cmdline: String::new(),
        memory,
        vcpus,
        created: state::now(),
        origin: Origin::Incoming,
        // The source host (its connection's port is an ephemeral one).
        source: Some(peer.ip().to_string()),
        boot_refused: None,
    };
    let mut reg = d.reg();
    if let Some(vm) = reg.vms.get(name) {
        if vm.state == st::MIGRATED {
            return Err(format!(
                "a VM named '{name}' has just migrated away from this host and is still being \
                 removed here: try again in a moment"
            ));
        }
        return Err(format!("a VM named '{name}' already exists on this host"));
    }
    if dir.exists() {
        return Err(format!(
            "a VM named '{name}' already exists on this host (its directory is still there: \
             an earlier arrival or removal is being cleaned up, or `migd` was not told of it)"
        ));
    }
    // VMs still arriving have not taken all their memory yet: it is theirs
    // all the same (counted whole, whatever they hold already: on the safe
    // side), so that migrations arriving together cannot overcommit it.
    let arriving: u64 = reg
        .vms
        .values()
        .filter(|v| v.state == st::INCOMING)
        .map(|v| v.record.memory)
        .sum();
    if memory.saturating_add(arriving) > available {
        return Err(format!(
            "not enough memory: the VM has {} MiB, this host has {} MiB {whence}, {} MiB of it promised to VMs still arriving",
            memory >> 20,
            available >> 20,
            arriving >> 20
        ));
    }
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    reg.vms.insert(
        name.to_string(),
        VmEntry::new(record.clone(), st::INCOMING, None),
    );
    Ok(record)
}

/// The destination half of the handshake, with the checks of this host.
///
/// Integration point with `crates/migration`: `receive_hello`, then `accept` or `refuse`.
/// `None` when the connection was a cost-model probe, answered and done.
fn handshake(
    d: &Daemon,
    mut stream: Link,
    peer: SocketAddr,
    deadline: &mut Deadline,
) -> Result<Option<(Link, VmRecord)>> {
    use migration::handshake;
    let hello = handshake::receive_hello(&mut stream).context("reading the Hello")?;
    if hello.mode == migration::probe::PROBE_MODE {
        // A cost-model probe: answer it and keep nothing. Its 32 MiB take
        // what the link takes (the reads' own timeouts still apply).
        // (Cut as the Hello came: the caller names the deadline.)
        if deadline.lift() {
            anyhow::bail!("connection cut");
        }
        // The probe's own deadline, from the Hello on.
        let limit = probe_deadline();
        let probe = Deadline::start(stream.tcp().try_clone()?, limit);
        let served = handshake::accept(&mut stream, &hello)
            .and_then(|shared| handshake::receive_boot(&mut stream, &shared))
            .and_then(|_boot| migration::probe::serve(&mut stream));
        probe
            .judge("the probe", served)
            .with_context(|| format!("serving a probe from {peer}"))?;
        tracing::debug!(%peer, "probe served");
        return Ok(None);
    }
    // The peer's name, escaped for the log: checked only in `admit`, and a
    // line break in it would forge log lines.
    let shown = hello.name.escape_debug().to_string();
    tracing::info!(vm = %shown, memory = hello.memory, vcpus = hello.vcpus, mode = %hello.mode.escape_debug(), "migration offered");
    if let Some(reason) = handshake::host_cannot_run(&hello.vm) {
        tracing::warn!(vm = %shown, "refusing: {reason}");
        let _ = handshake::refuse(&mut stream, &reason);
        anyhow::bail!("refused {shown}: {reason}");
    }
    let record = match admit(d, &hello.name, hello.memory, hello.vcpus, peer) {
        Ok(r) => r,
        Err(reason) => {
            tracing::warn!(vm = %shown, "refusing: {reason}");
            let _ = handshake::refuse(&mut stream, &reason);
            anyhow::bail!("refused {shown}: {reason}");
        }
    };
    let accepted = handshake::accept(&mut stream, &hello)
        .context("sending Accept")
        .and_then(|shared| {
            handshake::receive_boot(&mut stream, &shared).context("reading the boot spec")
        })
        .and_then(|boot| {
            // The child reads with its own timeouts; it inherits this blocking socket as is.
            stream
                .set_read_timeout(None)
                .context("clearing the read timeout")?;
            Ok(boot)
        });
    let boot = match accepted {
        Ok(boot) => boot,
        Err(e) => {
            release(d, &hello.name);
            return Err(e);
        }
    };
    let mut record = record;
    if let Some(spec) = boot {
        // As the source sent it: a daemon restarted before the VM runs here
        // takes it from there as this one does now.
        let path = state::boot_path(&d.vm_dir(&hello.name));
        if let Err(e) = state::write_json_atomic(&path, &spec) {
            tracing::warn!("{e:#}");
        }
        // A file outside `boot_dirs` is not kept, but the VM still comes.
        record.adopt_boot_spec(spec, &d.boot_dirs, "its source");
        if let Some(vm) = d.reg().vms.get_mut(&hello.name) {
            vm.record = record.clone();
        }
    }
    Ok(Some((stream, record)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Migrations arriving together cannot promise the host more memory
    /// than it has: each counts the memory of those still arriving.
    #[test]
    fn vms_still_arriving_keep_their_memory_promised() {
        let state_dir = std::env::temp_dir().join(format!("migd-admit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state_dir);
        std::fs::create_dir_all(state_dir.join("vms")).unwrap();
        let d = Daemon::for_tests(&state_dir, Default::default());
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        // Two fifths of what is available, in whole 2 MiB: two fit, a third not.
        let share = vmm::memory::mem_available().unwrap() * 2 / 5 / (2 << 20) * (2 << 20);
        admit(&d, "a1", share, 1, peer).unwrap();
        admit(&d, "a2", share, 1, peer).unwrap();
        let e = admit(&d, "a3", share, 1, peer).unwrap_err();
        assert!(e.contains("promised to VMs still arriving"), "{e}");
        // Once one runs, its memory is counted by the host itself.
        d.reg().vms.get_mut("a1").unwrap().state = st::RUNNING.into();
        d.reg().vms.get_mut("a2").unwrap().state = st::RUNNING.into();
        admit(&d, "a3", share, 1, peer).unwrap();
        let _ = std::fs::remove_dir_all(&state_dir);
    }

    #[test]
    fn meminfo_is_readable() {
        assert!(vmm::memory::mem_available().is_some_and(|m| m > 0));
        assert!(vmm::memory::huge_pages_available().is_some());
    }

    #[test]
    fn boot_spec_is_kept_only_where_its_files_are_here() {
        let record = || VmRecord {
            name: "web1".into(),
            kernel: None,
            initramfs: None,
            cmdline: String::new(),
            memory: 1 << 30,
            vcpus: 1,
            created: 0,
            origin: Origin::Incoming,
            source: None,
            boot_refused: None,
        };
        let tmp = std::env::temp_dir().join(format!("migd-bootdirs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let images = tmp.join("images");
        let state_dir = tmp.join("state");
        let elsewhere = tmp.join("elsewhere");
        for d in [&images, &state_dir, &elsewhere] {
            std::fs::create_dir_all(d).unwrap();
        }
        let file = |p: &Path| {
            std::fs::write(p, b"kernel").unwrap();
            p.to_str().unwrap().to_string()
        };
        let kernel = file(&images.join("vmlinux"));
        let initrd = file(&images.join("initrd"));
        let outside = file(&elsewhere.join("secret"));
        let in_state = file(&state_dir.join("console.log"));
        let link = images.join("link");
        std::os::unix::fs::symlink(elsewhere.join("secret"), &link).unwrap();
        let link = link.to_str().unwrap().to_string();
        // `images` given through a link of its own: resolved too.
        let images_link = tmp.join("images-link");
        std::os::unix::fs::symlink(&images, &images_link).unwrap();
        let dirs = state::BootDirs {
            dirs: vec![images_link, tmp.join("not-there")],
            state_dir: state_dir.clone(),
        };
        let spec = wire::BootSpec {
            kernel: kernel.clone(),
            initrd: Some(initrd.clone()),
            cmdline: "console=ttyS0".into(),
        };
        let mut r = record();
        r.adopt_boot_spec(spec.clone(), &dirs, "its source");
        assert_eq!(r.kernel.as_deref(), Some(Path::new(&kernel)));
        assert_eq!(r.cmdline, "console=ttyS0");
        assert_eq!(r.boot_refused, None);
        assert_eq!(r.boot_spec(), Some(spec.clone()), "sent on as it came");
        assert_eq!(r.check_boot_files(&dirs), Ok(()));
        // Not kept: not on this host, outside the directories (also through
        // a link in them), in the state dir (even were it one of them), a
        // relative path.
        let dirs_and_state = state::BootDirs {
            dirs: vec![images.clone(), state_dir.clone()],
            ..dirs.clone()
        };
        for (bad, dirs, why) in [
            ("/nonexistent/vmlinux", &dirs, "is not on this host"),
            (outside.as_str(), &dirs, "lies outside boot_dirs"),
            (link.as_str(), &dirs, "lies outside boot_dirs"),
            (
                in_state.as_str(),
                &dirs_and_state,
                "lies in migd's state dir",
            ),
            ("images/vmlinux", &dirs, "is not an absolute path"),
        ] {
            for spec in [
                wire::BootSpec {
                    kernel: bad.into(),
                    ..spec.clone()
                },
                wire::BootSpec {
                    initrd: Some(bad.into()),
                    ..spec.clone()
                },
            ] {
                let mut r = record();
                r.adopt_boot_spec(spec.clone(), dirs, "its source");
                // Kept, to go on with the VM, but not booted here.
                assert_eq!(r.boot_spec(), Some(spec.clone()), "{spec:?}");
                let e = r.check_boot_files(dirs).unwrap_err();
                assert!(e.contains(bad) && e.contains(why), "{spec:?}: {e}");
                let not_kept = r.boot_refused.unwrap_or_default();
                assert!(
                    not_kept.contains(bad) && not_kept.contains(why),
                    "{spec:?}: {not_kept}"
                );
                if why.contains("outside") {
                    assert!(not_kept.contains("boot_dirs"), "{not_kept}");
                }
            }
        }
        // A record that holds such a file (an earlier migd's) is refused at
        // `start`, unless the operator created the VM.
        let mut r = record();
        r.kernel = Some(outside.clone().into());
        let e = r.check_boot_files(&dirs).unwrap_err();
        assert!(
            e.contains(&outside) && e.contains("outside boot_dirs"),
            "{e}"
        );
        r.origin = Origin::Restored;
        assert!(r
            .check_boot_files(&dirs)
            .unwrap_err()
            .contains("its snapshot file"));
        r.origin = Origin::Created;
        assert_eq!(r.check_boot_files(&dirs), Ok(()));
        let _ = std::fs::remove_dir_all(&tmp);
    }
}

#[cfg(test)]
mod peer_tests {
    use super::*;

    /// A peer is an IPv4 address, or an IPv6 /64 (one host holds a whole
    /// /64: per address, it would get the caps many times over).
    #[test]
    fn peers_count_by_ipv4_address_or_ipv6_prefix() {
        let key = |s: &str| peer_key(s.parse().unwrap()).to_string();
        assert_eq!(key("10.0.0.7"), "10.0.0.7");
        assert_eq!(key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2:ffff::9"), "2001:db8:1:2::");
        assert_ne!(key("2001:db8:1:3::1"), "2001:db8:1:2::");
        assert_eq!(key("::ffff:10.0.0.7"), "10.0.0.7");
    }
}
