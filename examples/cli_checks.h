// Option validators for the example programs: CLI11's PositiveNumber prints "Value 0 not in range 0.000000
// to 1.797...e308"; these say what is wanted ("--batch: must be >= 1, got 0").
#pragma once
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <string>

namespace fg::cli {

inline CLI::Validator number_check(double bound, bool strict) {
  const std::string what = fmt::format("{} {}", strict ? ">" : ">=", bound);
  return CLI::Validator(
      [bound, strict, what](std::string& s) -> std::string {
        double v = 0;
        if (!CLI::detail::lexical_cast(s, v)) return fmt::format("expected a number, got '{}'", s);
        return (strict ? v > bound : v >= bound) ? std::string() : fmt::format("must be {}, got {}", what, s);
      },
      what);
}
inline CLI::Validator at_least(double bound) { return number_check(bound, false); }
inline CLI::Validator greater_than(double bound) { return number_check(bound, true); }

}  // namespace fg::cli
