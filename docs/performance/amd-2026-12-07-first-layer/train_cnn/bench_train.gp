set datafile separator ','
set terminal pngcairo size 1000,600 noenhanced
set output 'train_cnn/bench_train.png'
set title 'train speed, cnn, lars, bf16, 2 thread(s)'
set xlabel 'batch size'
set ylabel 'images/s'
set key outside right
set grid
set logscale x 2
set y2label 'step time (s)'
set y2tics
set ytics nomirror
plot 'train_cnn/bench_train.csv' using 1:($3) every ::1 with linespoints title 'largebatch images/s', \
     'train_cnn/bench_train.csv' using 1:($5) every ::1 with linespoints title 'PyTorch Python images/s', \
     'train_cnn/bench_train.csv' using 1:($2) every ::1 axes x1y2 with linespoints title 'largebatch step time', \
     'train_cnn/bench_train.csv' using 1:($4) every ::1 axes x1y2 with linespoints title 'PyTorch Python step time'
