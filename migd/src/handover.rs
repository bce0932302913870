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
//! old → new  {"cmd":"state","state_len":N,"paused_at_ns":T}, then N state bytes
//! new → old  {"cmd":"restored"}            (state loaded, still paused)
//! old → new  {"cmd":"commit"}              (old has stopped its vCPUs for good)
//! new → old  {"cmd":"running","downtime_us":D}
//! ```
//! Until the old process sends `commit` it resumes the VM on any failure; the new
//! process resumes only after it has received `commit`. The VM is paused only
//! from `prepared` on, so building the new VM costs the guest nothing.

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

/// Sends the paused VM's state: a line with its length and the pause time, then the bytes.
pub fn send_state(stream: &mut UnixStream, paused_at_ns: u64, state: &[u8]) -> Result<()> {
    send_line(
        stream,
        &serde_json::json!({"cmd": "state", "state_len": state.len(), "paused_at_ns": paused_at_ns}),
    )?;
    stream.write_all(state)?;
    Ok(())
}

/// Receives what [`send_state`] sent: (pause time, state bytes).
pub fn recv_state(reader: &mut BufReader<UnixStream>) -> Result<(u64, Vec<u8>)> {
    let v = expect_cmd(reader, "state")?;
    let len = v
        .get("state_len")
        .and_then(|l| l.as_u64())
        .ok_or_else(|| anyhow!("state without a length"))? as usize;
    if len > vmm::state::MAX_STATE_BYTES {
        bail!("state of {len} bytes is larger than allowed");
    }
    let paused_at_ns = v.get("paused_at_ns").and_then(|t| t.as_u64()).unwrap_or(0);
    let mut state = vec![0u8; len];
    reader
        .read_exact(&mut state)
        .context("reading the VM state")?;
    Ok((paused_at_ns, state))
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
        let mut more = [0u8; 4096];
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
    stream.write_all(&line)?;
    Ok(())
}

/// Reads one JSON line (at most 64 KiB); EOF is an error.
pub fn read_line(reader: &mut BufReader<UnixStream>) -> Result<serde_json::Value> {
    let mut line = Vec::new();
    let n = reader
        .by_ref()
        .take(64 << 10)
        .read_until(b'\n', &mut line)?;
    if n == 0 {
        bail!("connection closed");
    }
    serde_json::from_slice(&line).with_context(|| {
        format!(
            "malformed message: {}",
            String::from_utf8_lossy(&line).trim_end()
        )
    })
}

/// Expects `{"cmd": want}` as the next line.
pub fn expect_cmd(reader: &mut BufReader<UnixStream>, want: &str) -> Result<serde_json::Value> {
    let v = read_line(reader)?;
    match v.get("cmd").and_then(|c| c.as_str()) {
        Some(c) if c == want => Ok(v),
        _ => bail!("expected '{want}', got {v}"),
    }
}
