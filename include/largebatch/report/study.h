#pragma once
// Studies: a sweep runs every combination of a grid as its own `largebatch` process in its own folder
// (sweep.h); a report turns the run folders' CSV files into report.md with tables and gnuplot plots
// (report.h). Kept so that code including this header still compiles.
#include <largebatch/report/report.h>
#include <largebatch/report/sweep.h>
