// Plots as PNG files (gnuplot.h).
#include "moeforge/util/gnuplot.h"

#include <cstdlib>

#include "moeforge/util/error.h"

namespace moeforge {

void run_gnuplot(const std::string& script) {
  const std::string cmd = "gnuplot '" + script + "' 2>'" + script + ".log'";
  if (std::system(cmd.c_str()) != 0)
    throw FileError(script, "gnuplot failed (see " + script + ".log; is gnuplot-nox installed?)");
}

}  // namespace moeforge
