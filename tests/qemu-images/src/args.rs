//! `key=value` boot arguments (the DomU's `/chosen/bootargs`, written by Xen from the domain
//! node of the dom0less configuration).

/// The value of `key=` in a whitespace-separated command line.
pub fn value<'a>(args: &'a str, key: &str) -> Option<&'a str> {
    args.split_ascii_whitespace().find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// A numeric value (decimal, or hex with `0x`).
pub fn number(args: &str, key: &str) -> Option<u64> {
    let v = value(args, key)?;
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

/// `/chosen/bootargs` of a device tree, if any.
pub fn bootargs(fdt: &[u8]) -> Option<&str> {
    let tree = fdt::Fdt::new(fdt).ok()?;
    tree.chosen().bootargs()
}

/// The first `/memory` node's range (base, size), with 2-cell addresses and sizes.
pub fn memory(fdt: &[u8]) -> Option<(u64, u64)> {
    let tree = fdt::Fdt::new(fdt).ok()?;
    let region = tree.memory().regions().next()?;
    Some((region.starting_address as u64, region.size? as u64))
}

/// A three-cell `<addr-hi addr-lo value>` property of `/chosen`.
fn chosen_addr_and_cell(fdt: &[u8], name: &str) -> Option<(u64, u32)> {
    let tree = fdt::Fdt::new(fdt).ok()?;
    let chosen = tree.find_node("/chosen")?;
    let v = chosen.property(name)?.value;
    if v.len() != 12 {
        return None;
    }
    let cell = |i: usize| u32::from_be_bytes([v[i * 4], v[i * 4 + 1], v[i * 4 + 2], v[i * 4 + 3]]);
    Some(((u64::from(cell(0)) << 32) | u64::from(cell(1)), cell(2)))
}

/// `/chosen/trusty-ipc-stack,el3-next = <hi lo el>`: where the EL3 monitor enters the normal
/// world (address, exception level 1 or 2).
pub fn el3_next(fdt: &[u8]) -> Option<(u64, u32)> {
    chosen_addr_and_cell(fdt, "trusty-ipc-stack,el3-next")
}

/// The total size a flattened device tree declares in its header (0 if it is not one).
pub fn fdt_size(header: &[u8]) -> usize {
    if header.len() < 8 || header[..4] != [0xd0, 0x0d, 0xfe, 0xed] {
        return 0;
    }
    u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_numbers() {
        let a = "trusty-vm.guest-domid=2 trusty-vm.call-evtchn=0xb x=";
        assert_eq!(value(a, "trusty-vm.guest-domid"), Some("2"));
        assert_eq!(number(a, "trusty-vm.call-evtchn"), Some(11));
        assert_eq!(number(a, "x"), None);
        assert_eq!(value(a, "trusty-vm"), None);
    }
}
