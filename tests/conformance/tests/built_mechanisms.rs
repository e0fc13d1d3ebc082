//! A build of the stack that leaves a sharing mechanism or call transport out (trusty-stack's
//! Cargo features, `Mechanisms`) refuses a platform that needs it with an error naming the
//! feature, and never picks another mechanism in its place. `StackConfig::mechanisms` narrows
//! what this (full) build may use, the way a build without the feature is narrowed.

use platforms::by_name;
use trusty_model::host::ModelMode;
use trusty_platform::plan::{CallTransport, Mechanism};
use trusty_stack::{bring_up_platform, BringUpError, Mechanisms, StackConfig};

/// Every profile with a path to Trusty.
const PROFILES: [&str; 7] = [
    "native-api4",
    "native-api5",
    "xen-dom0",
    "xen-domu-direct-mapped",
    "xen-domu-ffa-mediator",
    "xen-domu-trusty-mediator",
    "xen-domu-trusty-vm",
];

/// Each feature left out alone, with its name.
fn without_each() -> [(&'static str, Mechanisms); 4] {
    let all = Mechanisms::ALL;
    [
        ("ffa-handle", Mechanisms { ffa_handle: false, ..all }),
        ("ffa-direct", Mechanisms { ffa_direct: false, ..all }),
        ("xen-grant", Mechanisms { xen_grant: false, ..all }),
        ("phys", Mechanisms { phys: false, ..all }),
    ]
}

/// The feature a plan needs for its transport and its mechanism.
fn needs(transport: CallTransport, mechanism: Mechanism) -> [Option<&'static str>; 2] {
    let t = match transport {
        CallTransport::Smc => None,
        CallTransport::FfaDirect => Some("ffa-direct"),
        CallTransport::XenMailbox { .. } => Some("xen-grant"),
    };
    let m = match mechanism {
        Mechanism::Phys | Mechanism::PhysAttr | Mechanism::MediatedIpa => "phys",
        Mechanism::FfaHandle => "ffa-handle",
        Mechanism::XenGrant { .. } => "xen-grant",
    };
    [t, Some(m)]
}

#[test]
fn the_full_build_carries_everything() {
    assert_eq!(Mechanisms::BUILT, Mechanisms::ALL, "tests run with trusty-stack's default features");
    assert_eq!(StackConfig::default().mechanisms, Mechanisms::BUILT);
}

#[test]
fn a_platform_needing_what_was_left_out_is_refused_by_name_never_given_another_mechanism() {
    let mut refused = 0;
    for name in PROFILES {
        // What the full build decides here.
        let profile = by_name(name).expect("profile");
        let sim = profile.boot(ModelMode::Sync);
        let (dev, full) = bring_up_platform(profile.access(&sim), StackConfig::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
        drop(dev);
        let needed = needs(full.plan.transport, full.plan.mechanism);

        for (feature, only) in without_each() {
            let profile = by_name(name).expect("profile");
            let sim = profile.boot(ModelMode::Sync);
            let cfg = StackConfig { mechanisms: only, ..Default::default() };
            match bring_up_platform(profile.access(&sim), cfg) {
                Ok((_, up)) => {
                    assert!(!needed.contains(&Some(feature)), "{name} without {feature}: brought up with {}", up.plan);
                    assert_eq!(up.plan, full.plan, "{name} without {feature}: the same plan as the full build");
                }
                Err(e) => {
                    assert!(needed.contains(&Some(feature)), "{name} without {feature}: {e}");
                    let BringUpError::Unusable { plan, error } = &e else { panic!("{name} without {feature}: wrong error: {e}") };
                    assert_eq!(plan.mechanism, full.plan.mechanism, "{name} without {feature}: {e}");
                    assert_eq!(plan.transport, full.plan.transport, "{name} without {feature}: {e}");
                    assert!(error.missing.contains(&format!("trusty-stack feature `{feature}`")), "{name}: {e}");
                    assert_eq!(error.because, full.plan.reason, "{name}: {e}");
                    let text = e.to_string();
                    assert!(text.contains("left out of this build") && text.contains(full.plan.mechanism.name()), "{text}");
                    let m = sim.model();
                    assert!(m.faults().is_empty(), "{name} without {feature}: {:?}", m.faults());
                    assert_eq!(m.live_shares(), 0, "{name} without {feature}: nothing shared");
                    refused += 1;
                }
            }
        }
    }
    // native-api5 without ffa-handle, native-api4/xen-dom0/direct-mapped/trusty-mediator
    // without phys, the FF-A mediator without either FF-A feature, the Trusty VM without grants.
    assert_eq!(refused, 8);
}

#[test]
fn a_transport_left_out_is_refused_before_any_call_to_trusty() {
    for (name, feature) in [("xen-domu-ffa-mediator", "ffa-direct"), ("xen-domu-trusty-vm", "xen-grant")] {
        let only = without_each().into_iter().find(|(f, _)| *f == feature).expect("feature").1;
        let profile = by_name(name).expect("profile");
        let sim = profile.boot(ModelMode::Sync);
        let e = bring_up_platform(profile.access(&sim), StackConfig { mechanisms: only, ..Default::default() })
            .err()
            .unwrap_or_else(|| panic!("{name} without {feature} must fail"));
        assert!(matches!(e, BringUpError::Unusable { .. }), "{name}: {e}");
        let s = sim.model().stats();
        assert_eq!((s.fast_calls, s.std_calls, s.nops), (0, 0, 0), "{name}: {s:?}");
        assert_eq!((s.ffa_direct_requests, s.mailbox_calls), (0, 0), "{name}: {s:?}");
        assert_eq!(sim.ram().pages_in_use(), 0, "{name}: nothing allocated for a stack that cannot run");
    }
}

#[test]
fn a_forced_mechanism_left_out_is_refused_not_run() {
    let profile = by_name("xen-domu-trusty-vm").expect("profile");
    let sim = profile.boot(ModelMode::Sync);
    let cfg = StackConfig {
        force_mechanism: Some(Mechanism::Phys),
        mechanisms: Mechanisms { phys: false, ..Mechanisms::ALL },
        ..Default::default()
    };
    let e = bring_up_platform(profile.access(&sim), cfg).err().expect("must fail");
    let BringUpError::Unusable { plan, error } = &e else { panic!("wrong error: {e}") };
    assert_eq!(plan.mechanism, Mechanism::Phys);
    assert!(error.missing.contains("`phys`"), "{e}");
    assert!(sim.model().faults().is_empty(), "never shared, so nothing to fault on");
}

#[test]
fn the_check_names_the_first_thing_missing() {
    let none = Mechanisms { ffa_handle: false, ffa_direct: false, xen_grant: false, phys: false };
    assert_eq!(Mechanisms::ALL.and(none), none);
    assert_eq!(none.lacks_transport(CallTransport::Smc), None);
    assert!(none.lacks_transport(CallTransport::FfaDirect).is_some_and(|m| m.contains("`ffa-direct`")));
    let mailbox = CallTransport::XenMailbox { backend_domid: 1, call_evtchn: 2, kick_evtchn: 3 };
    assert!(none.lacks_transport(mailbox).is_some_and(|m| m.contains("`xen-grant`")));
    for m in [Mechanism::Phys, Mechanism::PhysAttr, Mechanism::MediatedIpa] {
        assert!(none.lacks_mechanism(m).is_some_and(|s| s.contains("`phys`")), "{m:?}");
        assert_eq!(Mechanisms::ALL.lacks_mechanism(m), None);
    }
    assert!(none.lacks_mechanism(Mechanism::FfaHandle).is_some_and(|s| s.contains("`ffa-handle`")));
    assert!(none.lacks_mechanism(Mechanism::XenGrant { backend_domid: 1 }).is_some_and(|s| s.contains("`xen-grant`")));
}
