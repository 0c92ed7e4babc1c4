//! PTX to machine code with `ptxas -v`, for what the compiled kernel needs per thread:
//! registers, stack, and spills to local memory. On a GPU the driver does this step
//! itself when the PTX is loaded; ptxas of the same CUDA release gives the same code.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::target::Arch;

/// What ptxas reports for one entry function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Resources {
    pub registers: u32,
    pub stack_bytes: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
    /// Static shared memory (cubecl allocates it dynamically, so 0 for its kernels).
    pub static_shared_bytes: u32,
}

impl Resources {
    pub fn spills(&self) -> bool {
        self.spill_store_bytes > 0 || self.spill_load_bytes > 0
    }
}

/// Assembles `ptx` (a file) for `arch` and reads the resources of `entry`.
pub fn assemble(ptxas: &Path, ptx: &Path, entry: &str, arch: Arch) -> Result<Resources> {
    let output = Command::new(ptxas)
        .arg("-v")
        .arg("--gpu-name")
        .arg(arch.nvrtc_name())
        .arg("-o")
        .arg("/dev/null")
        .arg(ptx)
        .output()
        .with_context(|| format!("cannot run {}", ptxas.display()))?;
    let log = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() {
        bail!(
            "ptxas failed on {} for {}:\n{log}",
            ptx.display(),
            arch.nvrtc_name()
        );
    }
    parse(&log, entry).with_context(|| format!("ptxas -v said:\n{log}"))
}

/// The resources of `entry` in ptxas's `-v` log.
pub fn parse(log: &str, entry: &str) -> Result<Resources> {
    let header = format!("Function properties for {entry}");
    let mut lines = log.lines().skip_while(|l| !l.contains(&header));
    if lines.next().is_none() {
        bail!("no function properties for {entry}");
    }
    let mut r = Resources::default();
    let mut seen_registers = false;
    for line in lines.take(3) {
        if line.contains("stack frame") {
            r.stack_bytes = number_before(line, "bytes stack frame")?;
            r.spill_store_bytes = number_before(line, "bytes spill stores")?;
            r.spill_load_bytes = number_before(line, "bytes spill loads")?;
        }
        if line.contains("Used") && line.contains("registers") {
            r.registers = number_before(line, "registers")?;
            r.static_shared_bytes = number_before(line, "bytes smem").unwrap_or(0);
            seen_registers = true;
        }
    }
    if !seen_registers {
        bail!("no register count for {entry}");
    }
    Ok(r)
}

/// The integer just before `what` in `line` ("256 bytes stack frame").
fn number_before(line: &str, what: &str) -> Result<u32> {
    let at = line
        .find(what)
        .with_context(|| format!("`{what}` not in `{line}`"))?;
    let word = line[..at].split_whitespace().last().unwrap_or("");
    word.parse()
        .with_context(|| format!("`{word}` before `{what}` is not a number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ptxas 13.4's log for the bf16 forward kernel at head size 128 (sm_90a).
    const LOG: &str = "ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'forward_kernel_f_bf16' for 'sm_90a'
ptxas info    : Function properties for forward_kernel_f_bf16
    400 bytes stack frame, 236 bytes spill stores, 172 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 400 bytes cumulative stack size
ptxas info    : Compile time = 190.607 ms
";

    #[test]
    fn reads_registers_stack_and_spills() {
        let r = parse(LOG, "forward_kernel_f_bf16").unwrap();
        assert_eq!(
            r,
            Resources {
                registers: 255,
                stack_bytes: 400,
                spill_store_bytes: 236,
                spill_load_bytes: 172,
                static_shared_bytes: 0,
            }
        );
        assert!(r.spills());
        let e = parse(LOG, "other_kernel").unwrap_err().to_string();
        assert!(e.contains("no function properties for other_kernel"), "{e}");
    }
}
