#pragma once
// Internal to src/report: the sections a study's report gets from its DIR/study.json (written by a sweep whose
// grid has a "select" block): the rule, every candidate's validation result, the chosen settings' test results
// over seeds, paired differences and variants.
#include "tables.h"

#include <ostream>
#include <string>
#include <utility>
#include <vector>

namespace largebatch {
namespace report {
namespace detail {

using Values = std::vector<std::pair<std::string, std::string>>;  // axis -> value, as the grid wrote it

struct StudyCell {
  std::string cell;
  Values values;                        // of the `within` axes, in their order
  std::vector<std::string> candidates;  // run folders, in grid order
  std::vector<Values> over;             // each candidate's values of the axes chosen over
  std::vector<bool> extended;           // added by the sweep beyond the grid's edge (select.extend)
};

struct StudyFollowUp {
  std::string run, from;  // its folder, and the candidate it was made from
  Values values;          // the values its block set (seed, and variants such as init)
};

struct StudyPlan {
  std::string grid, by;
  bool linear_eval = false;
  std::vector<std::string> within;
  std::vector<std::pair<std::string, std::string>> compare;
  std::string extend_axis;  // select.extend, when the grid had one
  double extend_factor = 0;
  int extend_times = 0;
  std::vector<StudyCell> cells;
  std::vector<StudyFollowUp> follow_ups;
};

// DIR/study.json when there is one (false otherwise); std::invalid_argument naming the file and field when it is
// not an lbt-study-1 file.
bool read_study(const fs::path& dir, StudyPlan& plan);

// Applies the rule to the candidates' files, checks that every follow-up present comes from the candidate the
// rule chooses (std::invalid_argument otherwise), and writes the study's sections to `md` and its tuning plots
// to `assets` (files appended to `made`). `follow` are the finished follow-up runs.
void write_study_sections(const StudyPlan& plan, const fs::path& dir, const std::vector<const Run*>& follow,
                          const fs::path& assets, std::ostream& md, std::vector<std::string>& made);

}  // namespace detail
}  // namespace report
}  // namespace largebatch
