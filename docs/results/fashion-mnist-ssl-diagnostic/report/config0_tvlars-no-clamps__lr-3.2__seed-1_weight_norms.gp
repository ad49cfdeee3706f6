set datafile separator ','
set terminal pngcairo size 1100,650 noenhanced
set output 'config0_tvlars-no-clamps__lr-3.2__seed-1_weight_norms.png'
set title 'weight norm |w| per layer: tvlars update_norm_clamp=none weight_norm_clamp=none'
set grid
set key outside right font ',8'
set xlabel 'step'
set ylabel '|w|'
set logscale y
plot 'config0_tvlars-no-clamps__lr-3.2__seed-1_layers_wide.csv' using 1:3 every ::1 with lines lc 1 dt 1 pt 1 title 'backbone.conv1.weight', \
     'config0_tvlars-no-clamps__lr-3.2__seed-1_layers_wide.csv' using 1:6 every ::1 with lines lc 2 dt 1 pt 2 title 'backbone.conv2.weight', \
     'config0_tvlars-no-clamps__lr-3.2__seed-1_layers_wide.csv' using 1:9 every ::1 with lines lc 3 dt 1 pt 3 title 'backbone.fc1.weight', \
     'config0_tvlars-no-clamps__lr-3.2__seed-1_layers_wide.csv' using 1:12 every ::1 with lines lc 4 dt 1 pt 4 title 'projector.linear0.weight', \
     'config0_tvlars-no-clamps__lr-3.2__seed-1_layers_wide.csv' using 1:15 every ::1 with lines lc 5 dt 1 pt 5 title 'projector.linear1.weight', \
     'config0_tvlars-no-clamps__lr-3.2__seed-1_layers_wide.csv' using 1:18 every ::1 with lines lc 6 dt 1 pt 6 title 'projector.linear2.weight'
