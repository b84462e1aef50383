use clap::Parser;
use std::io::IsTerminal;
use std::process::ExitCode;
use veil::cli::{BenchCommand, Cli, Command, RunArgs};
use veil::error::{Error, Kind};
use veil::vmm::Vm;
use veil_devices::StopReason;
use vmm_sys_util::terminal::Terminal;

fn fail(e: &Error) -> ExitCode {
    eprintln!("veil: error: {e}");
    ExitCode::from(e.kind.exit_code() as u8)
}

/// Host stdin for the guest's serial port, when it is a terminal (in raw
/// mode until veil exits).
struct RawStdin;

impl RawStdin {
    fn open() -> Option<(std::fs::File, RawStdin)> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return None;
        }
        let fd = std::os::fd::AsFd::as_fd(&stdin).try_clone_to_owned().ok()?;
        stdin.lock().set_raw_mode().ok()?;
        Some((std::fs::File::from(fd), RawStdin))
    }
}

impl Drop for RawStdin {
    fn drop(&mut self) {
        let _ = std::io::stdin().lock().set_canon_mode();
    }
}

fn run(args: RunArgs) -> ExitCode {
    let (file, flags) = match args.sources() {
        Ok(s) => s,
        Err(m) => return fail(&Error::new(Kind::Usage, m)),
    };
    let level = match args.log_level(&file) {
        Ok(l) => l,
        Err(m) => return fail(&Error::new(Kind::Usage, m)),
    };
    env_logger::Builder::new()
        .filter_level(level.filter())
        .format_timestamp_micros()
        .init();
    let config = match veil::config::resolve(file, flags) {
        Ok(c) => c,
        Err(m) => return fail(&Error::new(Kind::Usage, m)),
    };
    log::info!("starting VM: {}", config.describe());
    let vm = match Vm::build(&config, veil::probe_image::PROBE_ELF) {
        Ok(vm) => vm,
        Err(e) => return fail(&e),
    };
    let stdin = RawStdin::open();
    let (input, guard) = stdin.map_or((None, None), |(f, g)| (Some(f), Some(g)));
    let (result, _report) = vm.run(input, args.metrics.clone());
    drop(guard);
    match result {
        Ok(StopReason::DebugExit(status)) => {
            log::info!("guest exited with status {status}");
            ExitCode::from(status)
        }
        Ok(reason) => {
            log::info!("guest stopped: {reason:?}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            if let Kind::Terminated(signal) = e.kind {
                eprintln!("veil: {e}: vCPUs stopped, disks synced");
                return ExitCode::from((128 + signal) as u8);
            }
            fail(&e)
        }
    }
}

fn main() -> ExitCode {
    // SIGUSR1 asks for metrics; until the VM runs there are none to write,
    // but the signal must not kill veil either.
    let _ = signal_hook::flag::register(signal_hook::consts::SIGUSR1, Default::default());
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let text = e.to_string();
            let first = text
                .lines()
                .next()
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ");
            eprintln!("veil: error: {first} (see veil --help)");
            return ExitCode::from(Kind::Usage.exit_code() as u8);
        }
    };
    match cli.command {
        Command::Run(args) => run(*args),
        Command::Bench(b) => match b.what {
            BenchCommand::Boot(args) => match args.compare.harness(args.runs, 8, 1, 2000) {
                Some(h) => veil::bench::harness::run(&["boot".to_string()], &h),
                None => veil::bench::boot(&args),
            },
            BenchCommand::Blk(args) => match args.compare.harness(5, args.mib, args.qd, args.frames) {
                Some(h) => veil::bench::harness::run(&["blk".to_string()], &h),
                None => veil::bench::device::run(veil::bench::device::Kind::Blk, &args),
            },
            BenchCommand::Net(args) => match args.compare.harness(5, args.mib, args.qd, args.frames) {
                Some(h) => veil::bench::harness::run(&["net".to_string()], &h),
                None => veil::bench::device::run(veil::bench::device::Kind::Net, &args),
            },
            BenchCommand::Dma(args) => match args.compare.harness(5, args.mib, args.qd, args.frames) {
                Some(h) => veil::bench::harness::run(&["dma".to_string()], &h),
                None => veil::bench::dma::run(&args),
            },
            BenchCommand::Secure(args) => veil::bench::harness::run(&["secure".to_string()], &args),
            BenchCommand::Mem(args) => veil::bench::harness::run(&["mem".to_string()], &args),
            BenchCommand::All(args) => {
                let groups = if args.only.is_empty() {
                    vec!["all".to_string()]
                } else {
                    args.only.clone()
                };
                veil::bench::harness::run(&groups, &args)
            }
        },
        Command::ProbeElf(args) => match std::fs::write(&args.path, veil::probe_image::PROBE_ELF) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&Error::new(
                Kind::NoInput,
                format!("cannot write {}: {e}", args.path.display()),
            )),
        },
    }
}
