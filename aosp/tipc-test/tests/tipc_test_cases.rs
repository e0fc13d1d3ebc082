//! Every tipc-test case as an integration test, against the model run inside each call and on
//! its own thread.

use tipc_test::backend::SimBackend;
use tipc_test::cases::{self, Params, Rng};
use tipc_test::runner;
use trusty_model::host::ModelMode;

fn run_case(name: &str, mode: ModelMode, params: Params) {
    let t = cases::find(name).expect("known test");
    let mut b = SimBackend::native(mode).unwrap_or_else(|e| panic!("{e}"));
    let mut rng = Rng::new(0x5eed);
    runner::run_one(&mut b, t, &params, &mut rng).unwrap_or_else(|e| panic!("{name}: {e}"));
    b.shutdown().expect("clean teardown");
    assert_eq!(b.sim().model().live_shares(), 0);
}

fn quiet() -> Params {
    Params { silent: true, ..Default::default() }
}

macro_rules! case_tests {
    ($($fn_name:ident => $name:literal),* $(,)?) => {
        mod sync {
            use super::*;
            $( #[test] fn $fn_name() { run_case($name, ModelMode::Sync, quiet()); } )*
        }
        mod threaded {
            use super::*;
            $( #[test] fn $fn_name() { run_case($name, ModelMode::Threaded, quiet()); } )*
        }
    };
}

case_tests! {
    connect => "connect",
    connect_foo => "connect_foo",
    burst_write => "burst_write",
    echo => "echo",
    select => "select",
    blocked_read => "blocked_read",
    closer1 => "closer1",
    closer2 => "closer2",
    closer3 => "closer3",
    dev_uuid => "dev-uuid",
    ta_access => "ta-access",
    writev => "writev",
    readv => "readv",
    ta2ta_ipc => "ta2ta-ipc",
    send_fd => "send-fd",
}

#[test]
fn all_fifteen_are_listed() {
    assert_eq!(cases::ALL.len(), 15);
    assert!(cases::UNSUPPORTED.is_empty());
}

#[test]
fn echo_with_large_and_variable_messages_and_repeats() {
    for mode in [ModelMode::Sync, ModelMode::Threaded] {
        run_case("echo", mode, Params { repeat: 200, msgsize: 4000, ..quiet() });
        run_case("echo", mode, Params { repeat: 200, msgsize: 4080, variable: true, ..quiet() });
        run_case("writev", mode, Params { repeat: 50, msgsize: 4000, variable: true, ..quiet() });
        run_case("readv", mode, Params { repeat: 50, msgsize: 4000, variable: true, ..quiet() });
    }
}

#[test]
fn burst_write_with_more_messages_than_buffers() {
    run_case("burst_write", ModelMode::Sync, Params { repeat: 3, burst: 200, msgsize: 64, ..quiet() });
    run_case("burst_write", ModelMode::Threaded, Params { repeat: 3, burst: 200, msgsize: 64, ..quiet() });
}

#[test]
fn connect_to_a_named_service_with_repeats() {
    let p = Params { repeat: 20, srv: Some(cases::NS_ONLY.into()), ..quiet() };
    run_case("connect", ModelMode::Sync, p);
}

#[test]
fn bench_json_has_tipc_test_fields() {
    let r = runner::BenchResult { min: 1, max: 3, avg: 2, cold: 9 };
    let json = runner::bench_json("echo", &r);
    for field in ["\"schema_version\": 3", "\"suite_name\": \"tipc\"", "\"bench_name\": \"echo\"", "\"metric_name\": \"time_micro_sec\"", "\"min\": \"1\"", "\"raw_cold\": 9"] {
        assert!(json.contains(field), "{field} missing in {json}");
    }
}
