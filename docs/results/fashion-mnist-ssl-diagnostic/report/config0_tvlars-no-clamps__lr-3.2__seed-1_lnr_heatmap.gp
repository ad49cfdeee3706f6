set datafile separator ','
set terminal pngcairo size 1100,400 noenhanced
set output 'config0_tvlars-no-clamps__lr-3.2__seed-1_lnr_heatmap.png'
set title 'log10 trust ratio (LNR, incl. phi_t): tvlars update_norm_clamp=none weight_norm_clamp=none'
set grid
set key outside right font ',8'
set xlabel 'step'
set ytics ('backbone.conv1.weight' 0, 'backbone.conv2.weight' 1, 'backbone.fc1.weight' 2, 'projector.linear0.weight' 3, 'projector.linear1.weight' 4, 'projector.linear2.weight' 5) font ',7'
set yrange [-0.5:6-0.5]
set cblabel 'log10 r'
set palette rgb 33,13,10
unset key
set autoscale xfix
set style fill solid noborder
plot 'config0_tvlars-no-clamps__lr-3.2__seed-1_layers.csv' using 1:2:(1.000000):(0.5):(log10($3)) every ::1 with boxxyerror lc palette
