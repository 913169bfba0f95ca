// Shared main of the GoogleTest binaries. A crash (SIGSEGV, SIGBUS, SIGFPE, SIGABRT) prints the stack of the
// crashing thread before the process dies, so a failure on a remote GPU machine leaves more than an exit code.
// The process's scratch folder (tests/scratch.h) goes when every test passed.
#include <execinfo.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <csignal>
#include <system_error>

#include "tests/scratch.h"

namespace {

void print_stack_and_die(int sig) {
  void* frames[64];
  const int n = backtrace(frames, 64);
  const char msg[] = "\n*** fatal signal; stack (most recent call first):\n";
  (void)!write(STDERR_FILENO, msg, sizeof msg - 1);
  backtrace_symbols_fd(frames, n, STDERR_FILENO);  // async-signal-safe: no malloc
  std::signal(sig, SIG_DFL);
  std::raise(sig);
}

}  // namespace

int main(int argc, char** argv) {
  void* warm[1];
  backtrace(warm, 1);  // loads the unwinder now: the first call may allocate, which a signal handler must not
  for (int sig : {SIGSEGV, SIGBUS, SIGFPE, SIGABRT}) std::signal(sig, print_stack_and_die);
  ::testing::InitGoogleTest(&argc, argv);
  const int status = RUN_ALL_TESTS();
  std::error_code ignored;  // a folder that cannot be removed is left, as with a failure
  if (status == 0) std::filesystem::remove_all(fg::testing::scratch_dir(), ignored);
  return status;
}
