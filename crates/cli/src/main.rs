use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = rollwave::cli::Cli::from_env();
    rollwave::logging::init(&cli);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(rollwave::run(cli)) {
        Ok(_) if rollwave::out::failed() => ExitCode::FAILURE,
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", rollwave::error_line(&e));
            ExitCode::from(rollwave::exit_code(&e))
        }
    }
}
