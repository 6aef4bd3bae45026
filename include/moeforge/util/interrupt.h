// SIGINT / SIGTERM as a request to stop cleanly (docs/reliability.md): `moeforge train` finishes the
// current step, writes a checkpoint and exits non-zero saying how to resume.
#pragma once

namespace moeforge {

// Installs handlers for SIGINT and SIGTERM that record the signal. A second signal while the first is being
// handled restores the default action and re-raises it (the process ends at once; checkpoints are atomic,
// so the previous one stays intact).
void install_stop_handlers();

// The signal received since install_stop_handlers() (SIGINT or SIGTERM), or 0.
int stop_signal();

// Forgets a received signal (tests).
void clear_stop_signal();

}  // namespace moeforge
