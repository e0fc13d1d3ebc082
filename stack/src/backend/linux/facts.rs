//! Platform facts as Linux shows them to userspace, fed to the same reader and decision as
//! everywhere else:
//! - the device tree Linux booted with, as the directory tree `/proc/device-tree` (a node per
//!   directory, a property per file, its raw value as the file's bytes; drivers/of/base.c
//!   `__of_add_property_sysfs`), written back into a flattened blob with the platform's own
//!   writer, so [`trusty_platform::facts::read_device_tree`] reads it as it reads any DTB;
//! - the boot arguments from `/proc/cmdline` (what the kernel really got), written as
//!   `/chosen/bootargs` of that blob;
//! - Xen's feature bits (XENVER_get_features submap 0) from
//!   `/sys/hypervisor/properties/features` (drivers/xen/sys-hypervisor.c, `%08x`), where
//!   the kernel has CONFIG_XEN_SYS_HYPERVISOR (Debian's arm64 kernel does).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use trusty_platform::dtb::Writer;

/// Deeper directory trees are refused (the reader refuses deeper device trees too).
const MAX_DEPTH: usize = 32;
/// A device tree bigger than this is refused (a DomU's is a few KiB).
const MAX_BYTES: usize = 4 << 20;

/// Where the Linux files are: `/` on a real system, a test directory in tests.
#[derive(Clone, Debug)]
pub struct LinuxRoot(pub PathBuf);

impl Default for LinuxRoot {
    fn default() -> Self {
        LinuxRoot(PathBuf::from("/"))
    }
}

impl LinuxRoot {
    fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }

    /// The device tree as a flattened blob, with `/proc/cmdline` (when readable) as
    /// `/chosen/bootargs`. An error names the path that could not be read.
    pub fn device_tree(&self) -> Result<Vec<u8>, String> {
        let dt = self.path("proc/device-tree");
        let cmdline = fs::read_to_string(self.path("proc/cmdline")).ok().map(|s| s.trim().to_string());
        if !dt.is_dir() {
            return Err(format!(
                "{} is not there: this Linux was not booted with a device tree (an ACPI boot shows no \
                 /hypervisor node to decide from)",
                dt.display()
            ));
        }
        let mut w = Writer::new();
        let mut budget = MAX_BYTES;
        write_node(&mut w, &dt, "", 0, cmdline.as_deref(), &mut budget).map_err(|e| format!("{}: {e}", dt.display()))?;
        Ok(w.finish())
    }

    /// XENVER_get_features submap 0, from `/sys/hypervisor/properties/features`.
    pub fn xen_features(&self) -> Option<u32> {
        let text = fs::read_to_string(self.path("sys/hypervisor/properties/features")).ok()?;
        u32::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok()
    }

    /// `/sys/hypervisor/type` (`xen` in a Xen guest whose kernel found Xen).
    pub fn hypervisor_type(&self) -> Option<String> {
        fs::read_to_string(self.path("sys/hypervisor/type")).ok().map(|s| s.trim().to_string())
    }
}

fn too_big() -> io::Error {
    io::Error::other(format!("more than {MAX_BYTES} bytes of properties"))
}

/// Writes the node at `dir` (named `name`) and everything below it: properties (files) first,
/// then child nodes (directories), each in name order. Symbolic links are skipped (the tree
/// itself has none; `/proc/device-tree` is followed as the root only).
fn write_node(
    w: &mut Writer,
    dir: &Path,
    name: &str,
    depth: usize,
    bootargs: Option<&str>,
    budget: &mut usize,
) -> io::Result<()> {
    if depth >= MAX_DEPTH {
        return Err(io::Error::other(format!("deeper than {MAX_DEPTH} levels")));
    }
    let mut files = Vec::new();
    let mut dirs = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let Ok(entry_name) = entry.file_name().into_string() else { continue };
        if kind.is_file() {
            files.push(entry_name);
        } else if kind.is_dir() {
            dirs.push(entry_name);
        }
    }
    files.sort();
    dirs.sort();
    w.begin_node(name);
    let chosen = depth == 1 && name == "chosen";
    for f in &files {
        if chosen && bootargs.is_some() && f == "bootargs" {
            continue;
        }
        let value = fs::read(dir.join(f))?;
        *budget = budget.checked_sub(value.len() + f.len()).ok_or_else(too_big)?;
        w.property(f, &value);
    }
    if chosen {
        if let Some(args) = bootargs {
            w.property_str("bootargs", args);
        }
    }
    for d in &dirs {
        write_node(w, &dir.join(d), d, depth + 1, bootargs, budget)?;
    }
    // The kernel's command line is a fact even where the tree has no /chosen.
    if depth == 0 && !dirs.iter().any(|d| d == "chosen") {
        if let Some(args) = bootargs {
            w.begin_node("chosen");
            w.property_str("bootargs", args);
            w.end_node();
        }
    }
    w.end_node();
    Ok(())
}
