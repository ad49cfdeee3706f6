set datafile separator ','
set terminal pngcairo size 1100,650 noenhanced
set output 'config24_wa-lars__lr-4__batch-size-16384__seed-1_sharpness.png'
set title 'sharpness and test top-1: wa-lars'
set grid
set key outside right font ',8'
set xlabel 'step'
set ylabel 'top Hessian eigenvalue'
set y2label 'test top-1'
set y2tics
set ytics nomirror
plot '../wa-lars__lr-4__batch-size-16384__seed-1/sharpness.csv' using 1:($5 == 1 ? $3 : 1/0) every ::1 with linespoints pt 7 title 'sharpness', \
     '../wa-lars__lr-4__batch-size-16384__seed-1/sharpness.csv' using 1:($5 == 1 ? 1/0 : $3) every ::1 with points pt 6 ps 2 lc rgb 'red' title 'not converged (left out of the table)', \
     '../wa-lars__lr-4__batch-size-16384__seed-1/metrics.csv' using 2:8 every ::1 axes x1y2 with linespoints title 'test top-1'
