//! The flattened device tree the guest boots with, and its command line: `read_device_tree`
//! promises never to panic whatever the blob holds; this fuzzes our own reader
//! (`trusty_platform::dtb`, written because AOSP has no `fdt` crate) through it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trusty_platform::facts::{read_device_tree, trusty_vm_from_bootargs};

fuzz_target!(|data: &[u8]| {
    if let Ok(facts) = read_device_tree(data) {
        // Domain ids below DOMID_FIRST_RESERVED only.
        if let Some((domid, _, _)) = facts.trusty_vm {
            assert!(domid < 0x7FF0);
        }
        if let Some(domid) = facts.domid {
            assert!(domid < 0x7FF0);
        }
    }
    let args = String::from_utf8_lossy(data);
    if let Ok(Some((domid, _, _))) = trusty_vm_from_bootargs(&args) {
        assert!(domid < 0x7FF0);
    }
});
