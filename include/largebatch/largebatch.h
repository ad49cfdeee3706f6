#pragma once
// The public headers of largebatch in one include.
#include <largebatch/core/runtime.h>
#include <largebatch/version.h>
#include <largebatch/optim/factory.h>
#include <largebatch/optim/layerwise.h>
#include <largebatch/optim/mask.h>
#include <largebatch/optim/schedule.h>
#include <largebatch/optim/telemetry.h>
#include <largebatch/data/dataset.h>
#include <largebatch/data/pipeline.h>
#include <largebatch/models/models.h>
#include <largebatch/report/plot.h>
#include <largebatch/train/trainer.h>
#include <largebatch/train/barlow_twins.h>
#include <largebatch/train/self_supervised.h>
#include <largebatch/dist/dist.h>
