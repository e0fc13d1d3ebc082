//! Writes the seed corpora under `fuzz/seeds/<target>/` (small, committed; the working corpus
//! `fuzz/corpus/` is not). Device trees are named `.fdt`, as the repository ignores `*.dtb`.
//! Run from anywhere:
//!
//! ```sh
//! cargo run --manifest-path fuzz/Cargo.toml --example gen_seeds
//! ```

use std::fs;
use std::path::{Path, PathBuf};

use tipc::wire::{self, heapless_name::Name, Ctrl, Header, ShmDesc, CTRL_ADDR};
use trusty_ipc_stack_fuzz::ring::op;
use trusty_platform::facts::read_device_tree;
use trusty_platform::ffa::{self, MemTransaction};
use trusty_platform::mem::{Access, PhysRange};
use trusty_platform::phys::{decode_compat, encode_compat};
use trusty_virtio::rsc::{self, TableBuilder, VringDecl, VIRTIO_ID_TIPC};
use vm_fdt::FdtWriter;

fn seeds_dir(target: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds").join(target);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    fs::write(seeds_dir(target).join(name), bytes).unwrap();
}

fn rsc_seeds() {
    write("rsc_parse", "default-tipc-table", &rsc::default_tipc_table("dev0"));
    let rings = [VringDecl { align: 4096, num: 8, notifyid: 1 }];
    let t = TableBuilder::new()
        .raw_entry(7, &[1, 2, 3, 4])
        .vdev(VIRTIO_ID_TIPC, 0, &rings, &rsc::tipc_config(4096, 4096, "dev1"))
        .vdev(VIRTIO_ID_TIPC, 1, &[], &[])
        .build();
    assert_eq!(rsc::parse(&t).unwrap().len(), 2);
    write("rsc_parse", "skip-entry-and-two-vdevs", &t);
}

/// `used` (LE u32) followed by the frame.
fn frame_seed(name: &str, frame: &[u8]) {
    wire::parse_frame(frame, frame.len() as u32).unwrap();
    let mut seed = (frame.len() as u32).to_le_bytes().to_vec();
    seed.extend_from_slice(frame);
    write("tipc_frame", name, &seed);
}

fn tipc_seeds() {
    let ctrl = |msg: Ctrl, src: u32| {
        let mut buf = [0u8; 512];
        let n = wire::encode_ctrl(&msg, src, &mut buf).unwrap();
        buf[..n].to_vec()
    };
    let rsp = Ctrl::ConnRsp { target: 1024, status: 0, remote: 1001, max_msg_size: 4096, max_msg_cnt: 1 };
    frame_seed("conn-rsp", &ctrl(rsp, CTRL_ADDR));
    frame_seed("go-online", &ctrl(Ctrl::GoOnline, CTRL_ADDR));
    let name = Name::new(b"com.android.ipc-unittest.srv.echo").unwrap();
    frame_seed("conn-req", &ctrl(Ctrl::ConnReq { name }, 1024));
    frame_seed("disc-req", &ctrl(Ctrl::DiscReq { target: 1001 }, 1024));
    frame_seed("release", &ctrl(Ctrl::Release { id: 0x42_0000_0007 }, CTRL_ADDR));
    frame_seed("unmap-rsp", &ctrl(Ctrl::UnmapRsp { result: -2, id: 9 }, CTRL_ADDR));

    let payload = b"hello, trusty";
    let h = Header { src: 1001, dst: 1024, shm_cnt: 0, len: payload.len() as u16, flags: 0 };
    let mut data = h.encode().to_vec();
    data.extend_from_slice(payload);
    frame_seed("data", &data);

    let shm = ShmDesc { obj_id: 0x42_0000_0007, size: 4096, tag: 0 };
    let h = Header { src: 1024, dst: 1001, shm_cnt: 1, len: (3 + wire::SHM_DESC_LEN) as u16, flags: 0 };
    let mut data = h.encode().to_vec();
    data.extend_from_slice(b"abc");
    data.extend_from_slice(&shm.encode());
    frame_seed("data-with-shm", &data);
}

fn ffa_seeds() {
    let seed = |name: &str, ranges: &[PhysRange]| {
        let tx = MemTransaction {
            sender: 5,
            receiver: ffa::TRUSTY_ENDPOINT_ID,
            attributes: ffa::ATTR_NORMAL_WB_INNER_SHAREABLE,
            permissions: ffa::PERM_RW,
            tag: 0,
            ranges,
        };
        let mut buf = vec![0u8; ffa::descriptor_len(ranges.len())];
        let n = ffa::encode_descriptor(&tx, &mut buf).unwrap();
        assert_eq!(ffa::decode_descriptor(&buf[..n], 256).unwrap().ranges, ranges);
        write("ffa_descriptor", name, &buf[..n]);
    };
    seed("one-range", &[PhysRange { addr: 0x4000_1000, pages: 2 }]);
    seed(
        "three-ranges",
        &[
            PhysRange { addr: 0x4000_0000, pages: 1 },
            PhysRange { addr: 0x4010_0000, pages: 16 },
            PhysRange { addr: 0x8_8000_0000, pages: 3 },
        ],
    );
}

/// The DomU tree a dom0less Xen writes, naming the Trusty VM on the command line.
fn bootargs_dtb() -> Vec<u8> {
    let mut w = FdtWriter::new().unwrap();
    let root = w.begin_node("").unwrap();
    w.property_u32("#address-cells", 2).unwrap();
    w.property_u32("#size-cells", 2).unwrap();
    let chosen = w.begin_node("chosen").unwrap();
    w.property_string("bootargs", "console=hvc0 trusty-ipc-stack.trusty-vm=1,10,11").unwrap();
    w.property_u32("trusty-ipc-stack,domid", 2).unwrap();
    w.end_node(chosen).unwrap();
    let hyp = w.begin_node("hypervisor").unwrap();
    w.property_string_list("compatible", vec!["xen,xen-4.17".into(), "xen,xen".into()]).unwrap();
    w.end_node(hyp).unwrap();
    w.end_node(root).unwrap();
    w.finish().unwrap()
}

/// `dtb` with an FDT_NOP token right after the root node's begin token (the path on which
/// `read_device_tree` rebuilds the blob).
fn with_nop(dtb: &[u8]) -> Vec<u8> {
    let word = |i: usize| u32::from_be_bytes(dtb[i * 4..i * 4 + 4].try_into().unwrap());
    let (total, off_struct, off_strings, size_struct) = (word(1), word(2), word(3), word(9));
    assert!(off_strings > off_struct, "strings block after the structure block");
    // The root's FDT_BEGIN_NODE with an empty name takes 8 bytes.
    let at = off_struct as usize + 8;
    let mut out = dtb[..at].to_vec();
    out.extend_from_slice(&4u32.to_be_bytes());
    out.extend_from_slice(&dtb[at..]);
    for (i, v) in [(1, total + 4), (3, off_strings + 4), (9, size_struct + 4)] {
        out[i * 4..i * 4 + 4].copy_from_slice(&v.to_be_bytes());
    }
    out
}

fn device_tree_seeds() {
    for p in platforms::all() {
        write("device_tree", &format!("{}.fdt", p.name), &p.fdt);
    }
    let dtb = bootargs_dtb();
    let facts = read_device_tree(&dtb).unwrap();
    assert_eq!((facts.trusty_vm, facts.domid), (Some((1, 10, 11)), Some(2)));
    assert_eq!(read_device_tree(&with_nop(&dtb)), Ok(facts));
    write("device_tree", "dom0less-bootargs.fdt", &dtb);
    write("device_tree", "dom0less-bootargs-nop.fdt", &with_nop(&dtb));
    write("device_tree", "bootargs.txt", b"console=hvc0 trusty-ipc-stack.trusty-vm=1,10,11 quiet");
}

fn compat_seeds() {
    let id = |name: &str, v: u64| {
        assert!(decode_compat(v).is_ok());
        write("compat_id", name, &v.to_le_bytes())
    };
    id("rw", encode_compat(0x4000_1000, Access::ReadWrite));
    id("ro", encode_compat(0xFFFF_FFFF_F000, Access::ReadOnly));
    id("uncached", 0x0044_0000_4000_1080);
}

/// Programs for `driver_ring` and `driver_ring_wrap` (see `src/ring.rs` for the encoding).
fn driver_ring_seeds() {
    use op::*;
    let entry = |slot: u16, id: u32, len: u32| {
        let mut v = vec![WRITE_USED_ENTRY | 0x10]; // any 32-bit id
        v.extend_from_slice(&slot.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
        v.extend_from_slice(&len.to_le_bytes());
        v
    };

    // 32-entry ring, 4096 alignment (Trusty's), 4 buffers; the device completes two of them
    // properly, then names one twice and one out of range, then jumps the index.
    let mut p = vec![5, 10, 4];
    p.extend(entry(0, 1, 20));
    p.extend(entry(1, 0, 30));
    p.extend([BUMP_USED_IDX, 2, POP, POP, POP]);
    p.extend(entry(2, 1, 0));
    p.extend(entry(3, 70_000, 0));
    p.extend([BUMP_USED_IDX, 2, DRAIN, WRITE_USED_IDX, 200, 0, POP, ADD, 0, 16, 0, 0]);
    for target in ["driver_ring", "driver_ring_wrap"] {
        write(target, "trusty-ring-hostile", &p);
    }

    // A one-entry ring and the largest one.
    write("driver_ring", "one-entry", &[0, 0, 1, WRITE_USED_IDX, 1, 0, POP, ADD, 0, 0, 0, 0, DRAIN]);
    write("driver_ring", "max-ring", &[0xFF, 10, 200, HONEST_CYCLES, 0xFF, BUMP_USED_IDX, 0xFF, DRAIN]);

    // Near the wrap: honest traffic across it on a 4-entry ring, then a hostile entry and index
    // on the far side.
    let mut p = vec![2, 0, 2, HONEST_CYCLES, 100, ADD, 1, 0, 0, 0];
    p.extend(entry(0xFFFF, 3, 1));
    p.extend([BUMP_USED_IDX, 1, DRAIN, WRITE_USED_IDX, 0xFF, 0xFF, POP]);
    write("driver_ring_wrap", "across-wrap", &p);
}

fn main() {
    rsc_seeds();
    tipc_seeds();
    ffa_seeds();
    device_tree_seeds();
    compat_seeds();
    driver_ring_seeds();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let (mut files, mut bytes) = (0, 0);
    for target in fs::read_dir(&root).unwrap() {
        for f in fs::read_dir(target.unwrap().path()).unwrap() {
            files += 1;
            bytes += f.unwrap().metadata().unwrap().len();
        }
    }
    println!("{files} seed files, {bytes} bytes under {}", root.display());
}
