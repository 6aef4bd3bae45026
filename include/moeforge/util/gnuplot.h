// Plots as PNG files: gnuplot (Debian's gnuplot-nox) run on a script the caller wrote. Used by the run
// report, the comparison and the benchmarks.
#pragma once

#include <string>

namespace moeforge {

// Runs gnuplot on a script (its stderr to <script>.log); throws FileError naming the script if it fails.
void run_gnuplot(const std::string& script);

}  // namespace moeforge
