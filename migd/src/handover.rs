//! Handing a running VM to another process on the same host.
//!
//! The memory does not move: the old process passes its memfd (SCM_RIGHTS) and
//! the captured state over a unix socket; the new process restores and resumes.
//! The exchange has one commit point so that exactly one process ever runs the
//! VM after the pause:
//!
//! ```text
//! new → old  {"cmd":"handover"}
//! old → new  {"ok":true,"memory":M,"vcpus":V,...} + memfd      (the VM still runs)
//! new → old  {"cmd":"prepared"}            (KVM VM, slots, vCPUs built over the memfd)
//! old → new  {"cmd":"state","state_len":N,"paused_at_ns":T,"extents_complete":B}, then N state bytes
//! new → old  {"cmd":"restored"}            (state loaded, still paused)
//! old → new  {"cmd":"commit"}              (old has stopped its vCPUs for good)
//! new → old  {"cmd":"running","downtime_us":D}
//! old → new  {"cmd":"data","extents":[[O,L],...]}   (only where the header said data_after_commit)
//! ```
//! Until the old process sends `commit` it resumes the VM on any failure; the new
//! process resumes only after it has received `commit`. The VM is paused only
//! from `prepared` on, so building the new VM costs the guest nothing.
//!
//! Memory on huge pages cannot be asked where its holes are; the old process
//! knows which huge pages hold data from its own mappings. It sends that list
//! with the memfd (`data_extents`), the new process maps those pages into its
//! mappings while the VM still runs, and at the pause the old process says
//! whether the list still names every page the memfd holds
//! (`extents_complete`; a page first touched in between makes it false).
//! Only then does the new process count data from its mappings; otherwise
//! its next migration or snapshot reads all of memory, as before.
//!
//! Memory allocated up front (`--prefault`) defeats that check: every page
//! is allocated. Where the old process knows its pages with data (from its
//! mappings, huge pages or 4 KiB pages locked on fault), it says so in the
//! header (`data_after_commit`) and sends the list once more after
//! `running`: taken then, with its vCPUs stopped for good, it names every
//! page with data. The new process counts from that list and what its own
//! mappings map from then on (4 KiB pages: locked on fault before the VM
//! runs there), and counts all of memory until the list comes.

use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

/// Header sent with the memfd.
#[derive(Debug, Serialize, Deserialize)]
pub struct HandoverHeader {
    /// Always true in a header (an error reply has ok=false).
    pub ok: bool,
    /// Guest RAM size.
    pub memory: u64,
    /// vCPU count.
    pub vcpus: usize,
    /// VM name, if any.
    pub name: Option<String>,
    /// Memory on huge pages: the (memfd offset, length) runs of huge pages
    /// that hold data, as the old process's mappings map them; absent
    /// elsewhere, and from an old process that cannot tell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_extents: Option<Vec<(u64, u64)>>,
    /// The old process sends its final data extents after `running` (see
    /// the module's text); false from an old process of an older build.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub data_after_commit: bool,
}

/// The most bytes a handover header may take (its data extents above all).
const MAX_HEADER_BYTES: usize = 16 << 20;

/// What [`send_state`] sends and [`recv_state`] returns.
#[derive(Debug)]
pub struct PausedState {
    /// CLOCK_MONOTONIC at the pause, ns.
    pub paused_at_ns: u64,
    /// The header's `data_extents` still name every page of memory.
    pub extents_complete: bool,
    /// The encoded `vmm::VmState`.
    pub state: Vec<u8>,
    /// The VM ran before the handover: the new process resumes it (an old
    /// sender that does not say so means yes); a paused VM stays paused.
    pub running: bool,
}

/// CLOCK_MONOTONIC now, in ns (one clock for both processes on a host).
pub fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64);
    t.unwrap_or(0)
}

/// Sends the header with the memfd attached.
pub fn send_vm(stream: &mut UnixStream, header: &HandoverHeader, memfd: RawFd) -> Result<()> {
    let mut line = serde_json::to_vec(header)?;
    line.push(b'\n');
    let fds = [memfd];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let iov = [IoSlice::new(&line)];
    let sent = sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
        .context("sending the memory descriptor")?;
    stream.write_all(&line[sent..])?;
    Ok(())
}

/// Sends the paused VM's state: a line with its length, the pause time and
/// whether the data extents are complete, then the bytes.
pub fn send_state(stream: &mut UnixStream, paused: &PausedState) -> Result<()> {
    send_line(
        stream,
        &serde_json::json!({
            "cmd": "state",
            "state_len": paused.state.len(),
            "paused_at_ns": paused.paused_at_ns,
            "extents_complete": paused.extents_complete,
            "running": paused.running,
        }),
    )?;
    stream.write_all(&paused.state)?;
    Ok(())
}

/// Receives what [`send_state`] sent.
pub fn recv_state(reader: &mut BufReader<UnixStream>) -> Result<PausedState> {
    let v = expect_cmd(reader, "state")?;
    let len = v
        .get("state_len")
        .and_then(|l| l.as_u64())
        .ok_or_else(|| anyhow!("state without a length"))? as usize;
    if len > vmm::state::MAX_STATE_BYTES {
        bail!("state of {len} bytes is larger than allowed");
    }
    let paused_at_ns = v.get("paused_at_ns").and_then(|t| t.as_u64()).unwrap_or(0);
    let extents_complete = v.get("extents_complete").and_then(|c| c.as_bool()) == Some(true);
    let running = v.get("running").and_then(|c| c.as_bool()) != Some(false);
    let mut state = vec![0u8; len];
    reader
        .read_exact(&mut state)
        .context("reading the VM state")?;
    Ok(PausedState {
        paused_at_ns,
        extents_complete,
        state,
        running,
    })
}

/// Receives the header and memfd sent by [`send_vm`].
pub fn recv_vm(stream: &mut UnixStream) -> Result<(HandoverHeader, OwnedFd)> {
    let mut buf = vec![0u8; 64 << 10];
    let mut cmsg_buf = nix::cmsg_space!([RawFd; 1]);
    let (n, fd) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg_buf),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .context("receiving the VM from the old process")?;
        let mut fd = None;
        for c in msg.cmsgs().context("reading control messages")? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for f in fds {
                    // SAFETY: a descriptor just received: nothing else owns it.
                    let owned = unsafe { vmm::memory::owned_fd(f) };
                    fd.get_or_insert(owned);
                }
            }
        }
        (msg.bytes, fd)
    };
    let mut data = buf[..n].to_vec();
    while !data.contains(&b'\n') {
        if data.len() > MAX_HEADER_BYTES {
            bail!("the handover header is larger than {MAX_HEADER_BYTES} bytes");
        }
        let mut more = [0u8; 64 << 10];
        let k = stream.read(&mut more)?;
        if k == 0 {
            bail!("old process closed the connection before sending the VM");
        }
        data.extend_from_slice(&more[..k]);
    }
    let nl = data.iter().position(|&b| b == b'\n').unwrap_or(0);
    let header_line = &data[..nl];
    let value: serde_json::Value = serde_json::from_slice(header_line)
        .with_context(|| format!("malformed reply: {}", String::from_utf8_lossy(header_line)))?;
    if value.get("ok") != Some(&serde_json::Value::Bool(true)) {
        bail!(
            "old process refused the handover: {}",
            value
                .get("error")
                .and_then(|e| e.as_str())
                .unwrap_or("no reason given")
        );
    }
    let header: HandoverHeader = serde_json::from_value(value)?;
    if nl + 1 != data.len() {
        bail!("unexpected bytes after the handover header");
    }
    let fd = fd.ok_or_else(|| anyhow!("no memory descriptor came with the VM"))?;
    Ok((header, fd))
}

/// Writes one JSON line.
pub fn send_line(stream: &mut UnixStream, value: &serde_json::Value) -> Result<()> {
    let mut line = serde_json::to_vec(value)?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .with_context(|| match value.get("cmd") {
            Some(c) => format!("sending {c} to the other process"),
            None => "sending a message to the other process".to_string(),
        })?;
    Ok(())
}

/// Reads one JSON line (at most 64 KiB); EOF is an error.
pub fn read_line(reader: &mut BufReader<UnixStream>) -> Result<serde_json::Value> {
    read_line_of(reader, 64 << 10)
}

/// Reads one JSON line of at most `max` bytes; EOF is an error. The last
/// line before EOF may lack its newline (`printf '{...}' | nc -U`): a JSON
/// object cut short does not parse, so a cut message is still refused.
fn read_line_of(reader: &mut BufReader<UnixStream>, max: u64) -> Result<serde_json::Value> {
    let mut line = Vec::new();
    let n = reader.by_ref().take(max).read_until(b'\n', &mut line)?;
    if n == 0 {
        bail!("connection closed");
    }
    if line.last() != Some(&b'\n') && n as u64 == max {
        bail!("a message longer than {max} bytes");
    }
    serde_json::from_slice(&line).with_context(|| {
        format!(
            "malformed message: {}",
            String::from_utf8_lossy(&line).trim_end()
        )
    })
}

/// Sends the final data extents (after `running`).
pub fn send_data(stream: &mut UnixStream, extents: &[(u64, u64)]) -> Result<()> {
    send_line(
        stream,
        &serde_json::json!({"cmd": "data", "extents": extents}),
    )
}

/// Receives what [`send_data`] sent (at most as many bytes as a header).
pub fn recv_data(reader: &mut BufReader<UnixStream>) -> Result<Vec<(u64, u64)>> {
    let v = expect_cmd_of(reader, "data", MAX_HEADER_BYTES as u64)?;
    let extents = v.get("extents").cloned().unwrap_or_default();
    serde_json::from_value(extents).context("malformed data extents")
}

/// Expects `{"cmd": want}` as the next line.
pub fn expect_cmd(reader: &mut BufReader<UnixStream>, want: &str) -> Result<serde_json::Value> {
    expect_cmd_of(reader, want, 64 << 10)
}

/// [`expect_cmd`] for a line of at most `max` bytes.
fn expect_cmd_of(
    reader: &mut BufReader<UnixStream>,
    want: &str,
    max: u64,
) -> Result<serde_json::Value> {
    let v = read_line_of(reader, max)
        .with_context(|| format!("waiting for '{want}' from the other process"))?;
    match v.get("cmd").and_then(|c| c.as_str()) {
        Some(c) if c == want => Ok(v),
        _ => bail!("expected '{want}', got {v}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The data extents travel with the memfd; a header without them (an
    /// old process on 4 KiB pages, or of an older build) reads as none.
    #[test]
    fn header_carries_data_extents_or_none() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let memfd = std::fs::File::open("/dev/null").unwrap();
        let header = HandoverHeader {
            ok: true,
            memory: 64 << 20,
            vcpus: 1,
            name: None,
            data_extents: Some(vec![(0, 2 << 20), (6 << 20, 4 << 20)]),
            data_after_commit: true,
        };
        send_vm(&mut a, &header, memfd.as_raw_fd()).unwrap();
        let (got, _fd) = recv_vm(&mut b).unwrap();
        assert_eq!(got.data_extents, header.data_extents);
        assert!(got.data_after_commit);
        let old: HandoverHeader =
            serde_json::from_str(r#"{"ok":true,"memory":1,"vcpus":1,"name":null}"#).unwrap();
        assert_eq!(old.data_extents, None);
        assert!(!old.data_after_commit);
    }

    /// The final list arrives whole, or not at all: a line of something
    /// else, malformed extents, or a cut line are errors.
    #[test]
    fn final_data_extents_come_whole_or_are_refused() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut r = BufReader::new(b);
        send_data(&mut a, &[(0, 4096), (1 << 20, 8192)]).unwrap();
        assert_eq!(recv_data(&mut r).unwrap(), vec![(0, 4096), (1 << 20, 8192)]);
        send_line(&mut a, &serde_json::json!({"cmd": "running"})).unwrap();
        assert!(recv_data(&mut r)
            .unwrap_err()
            .to_string()
            .contains("expected 'data'"));
        send_line(
            &mut a,
            &serde_json::json!({"cmd": "data", "extents": [[1]]}),
        )
        .unwrap();
        let e = format!("{:#}", recv_data(&mut r).unwrap_err());
        assert!(e.contains("malformed data extents"), "{e}");
        a.write_all(br#"{"cmd":"data","extents":[[0,4096]"#)
            .unwrap();
        drop(a);
        let e = format!("{:#}", recv_data(&mut r).unwrap_err());
        assert!(e.contains("malformed message"), "a cut line: {e}");
    }

    /// A request whose newline never comes, because the client closed its
    /// sending side right after it (`printf '{...}' | nc -N -U`), is read.
    #[test]
    fn a_last_line_without_its_newline_is_read() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut r = BufReader::new(b);
        a.write_all(br#"{"cmd":"status"}"#).unwrap();
        a.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(read_line(&mut r).unwrap()["cmd"], "status");
        assert!(read_line(&mut r)
            .unwrap_err()
            .to_string()
            .contains("connection closed"));
    }

    /// The state says whether the extents are complete and whether the VM
    /// ran; a state line without the flags says no and yes (an older sender).
    #[test]
    fn state_says_whether_the_extents_are_complete_and_the_vm_ran() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut r = BufReader::new(b);
        for (complete, running) in [(true, false), (false, true)] {
            let sent = PausedState {
                paused_at_ns: 7,
                extents_complete: complete,
                state: vec![1, 2, 3],
                running,
            };
            send_state(&mut a, &sent).unwrap();
            let got = recv_state(&mut r).unwrap();
            assert_eq!(
                (
                    got.paused_at_ns,
                    got.extents_complete,
                    got.state,
                    got.running
                ),
                (7, complete, vec![1, 2, 3], running)
            );
        }
        send_line(&mut a, &serde_json::json!({"cmd": "state", "state_len": 0})).unwrap();
        let got = recv_state(&mut r).unwrap();
        assert!(!got.extents_complete && got.running);
    }

    /// A header that never ends is refused, not read without bound.
    #[test]
    fn endless_header_is_refused() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let memfd = std::fs::File::open("/dev/null").unwrap();
        let writer = std::thread::spawn(move || {
            let fds = [memfd.as_raw_fd()];
            let cmsg = [ControlMessage::ScmRights(&fds)];
            let chunk = vec![b' '; 1 << 20];
            let iov = [IoSlice::new(&chunk)];
            sendmsg::<()>(a.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).unwrap();
            // Past the limit, unless the reader gives up first.
            for _ in 0..(MAX_HEADER_BYTES >> 20) + 2 {
                if a.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
        let e = recv_vm(&mut b).unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e:#}");
        drop(b);
        writer.join().unwrap();
    }
}
